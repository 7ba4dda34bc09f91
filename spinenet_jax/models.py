"""RetinaNet and classifier models, and `build_model(config)`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spinenet_jax import conv_impl
from spinenet_jax import heads
from spinenet_jax import norm_impl
from spinenet_jax import remat
from spinenet_jax import specs as specs_lib
from spinenet_jax.detection import anchors as anchors_lib
from spinenet_jax.spinenet import ScalePermutedNetwork, SpineNet
from spinenet_jax.spinenet_mobile import SpineNetMobile

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


# Model fields that SpineNet-Mobile has no use for, with the reason.
_NOT_MOBILE = {
    'resample_alpha': 'mobile resampling has no 1x1 reduction',
    'stem_filters': 'its stem width comes from filter_size_scale',
}


def _field_names(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}


class _WithBackbone(nn.Module):
  """Fields shared by the models: which SpineNet and how it is configured.

  Model ids ending in '_mobile' ('49_mobile', '49S_mobile', '49XS_mobile')
  build SpineNet-Mobile (`SpineNetMobile`); `resample_alpha` does not apply
  to it, and `se_ratio`, `expand_ratio` apply only to it. `activation=None`
  means the model id's default: swish, or Model Garden's choice for the
  mobile ids (hard_swish for 49 and 49S, swish for 49XS). Each field goes to
  the backbone field of the same name.
  """
  model_id: str = '49'
  block_specs: Sequence[Any] | None = None
  min_level: int = 3
  max_level: int = 7
  endpoints_num_filters: int | None = None
  filter_size_scale: float | None = None
  resample_alpha: float | None = None
  block_repeats: int | None = None
  stem_filters: int | None = None  # SpineNet only; None: 64 (Model Garden).
  activation: str | None = None
  se_ratio: float = 0.2
  expand_ratio: int = 6
  stochastic_depth_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  # How kxk convolutions are lowered: 'auto' (on CPU im2col matmuls for
  # small maps, Winograd for wide 3x3 ones on large maps, XLA's convolution
  # otherwise), 'xla', 'im2col', 'im2col_grad' or 'winograd'
  # (`conv_impl.py`).
  conv_impl: str = 'auto'
  # How training-mode batch norm is differentiated: 'auto' (its gradient
  # written out on CPU, JAX's derivation elsewhere), 'flax' or 'fused'
  # (`norm_impl.py`).
  norm_impl: str = 'auto'
  # What the backward pass recomputes instead of keeping: 'none', 'blocks'
  # or 'full' (`remat.MODES`); the results are the same.
  remat: str = 'none'

  _resize_fallback = False  # Not a field: the backbone's, fixed per model.

  @property
  def is_mobile(self) -> bool:
    """Whether `model_id` is a SpineNet-Mobile id ('*_mobile')."""
    return specs_lib.is_mobile(self.model_id)

  def scaling(self) -> specs_lib.Scaling | specs_lib.MobileScaling:
    """The scaling of `model_id` (before any field overrides it)."""
    return specs_lib.get_any_scaling(self.model_id)

  def resolved_activation(self) -> str:
    """`activation`, or the model id's default where it is None."""
    if self.activation is not None:
      return self.activation
    return self.scaling().activation if self.is_mobile else 'swish'

  def backbone(self) -> ScalePermutedNetwork:
    """The backbone as an unbound module (e.g. for its `plan()`)."""
    return self._backbone(parent=None)

  def _backbone(self, **kwargs: Any) -> ScalePermutedNetwork:
    cls = SpineNetMobile if self.is_mobile else SpineNet
    if self.is_mobile:
      for name, why in _NOT_MOBILE.items():
        if getattr(self, name) is not None:
          raise ValueError(f'{name} does not apply to SpineNet-'
                           f'{self.model_id} ({why}); leave it None.')
    fields = {name: getattr(self, name)
              for name in _field_names(cls) & _field_names(type(self))}
    fields['activation'] = self.resolved_activation()
    return cls(**fields, resize_fallback=self._resize_fallback, **kwargs)


class RetinaNet(_WithBackbone):
  """SpineNet + RetinaNet head; returns {'cls_outputs', 'box_outputs'}.

  Each is a dict from level (min_level..max_level) to `[B, H_l, W_l, A * K]`,
  with A = num_scales * len(aspect_ratios) anchors per location.
  """
  num_classes: int = 91
  num_scales: int = 3
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  anchor_size: float | None = None
  head_num_convs: int | None = None
  head_num_filters: int | None = None
  # None: separable for the mobile ids (Model Garden), plain convs otherwise.
  head_use_separable_conv: bool | None = None

  @property
  def num_anchors(self) -> int:
    """Anchors per location: num_scales * len(aspect_ratios)."""
    return self.num_scales * len(self.aspect_ratios)

  def anchor_config(self) -> dict[str, Any]:
    """Keyword arguments for `detection.anchors.multilevel_anchors`."""
    return dict(min_level=self.min_level, max_level=self.max_level,
                num_scales=self.num_scales,
                aspect_ratios=tuple(self.aspect_ratios),
                anchor_size=(self.scaling().anchor_size
                             if self.anchor_size is None else self.anchor_size))

  def anchors(self, image_size: int | Sequence[int]) -> np.ndarray:
    """`[N, 4]` yxyx anchors of an input size, in the outputs' flat order."""
    return anchors_lib.multilevel_anchors(image_size, **self.anchor_config())

  def head(self) -> heads.RetinaNetHead:
    """The head as an unbound module."""
    return self._head(parent=None)

  def _head(self, **kwargs: Any) -> heads.RetinaNetHead:
    s = self.scaling()
    return heads.RetinaNetHead(
        self.num_classes, self.num_anchors,
        s.head_num_convs if self.head_num_convs is None else self.head_num_convs,
        s.head_num_filters if self.head_num_filters is None
        else self.head_num_filters,
        self.resolved_activation(), self.bn_momentum, self.bn_epsilon,
        self.dtype,
        use_separable_conv=(
            getattr(s, 'head_use_separable_conv', False)
            if self.head_use_separable_conv is None
            else self.head_use_separable_conv),
        conv_impl=self.conv_impl, norm_impl=self.norm_impl, **kwargs)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> dict[str, dict[int, jax.Array]]:
    feats = self._backbone(name='backbone')(images, train)
    return self._head(name='head')(feats, train)


class Classifier(_WithBackbone):
  """SpineNet + classification head; returns float32 logits `[B, classes]`.

  Input sizes need not divide by 2^max_level (e.g. 224): resampling then falls
  back to nearest resizing, as in the original TPU implementation.
  """
  num_classes: int = 1001
  dropout_rate: float = 0.0

  _resize_fallback = True

  def head(self) -> heads.ClassificationHead:
    """The head as an unbound module."""
    return self._head(parent=None)

  def _head(self, **kwargs: Any) -> heads.ClassificationHead:
    return heads.ClassificationHead(self.num_classes, self.dropout_rate,
                                    self.dtype, **kwargs)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    feats = self._backbone(name='backbone')(images, train)
    return self._head(name='head')(feats, train)


TASKS = {'retinanet': RetinaNet, 'classification': Classifier}


def get_dtype(name: str) -> Any:
  """The jnp dtype called `name` ('float32', 'bfloat16', 'float16')."""
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.')
  return DTYPES[name]


def build_model(config: Any) -> RetinaNet | Classifier:
  """Builds the model of `config.task` from `config.model` and `config.dtype`.

  `config.task` is 'retinanet' or 'classification'; `config.model` holds the
  model's fields (model_id, num_classes, block_specs, ...).
  """
  task = config.get('task', 'retinanet')
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; expected one of {sorted(TASKS)}.')
  cls = TASKS[task]
  kwargs = dict(config.get('model', {}))
  fields = _field_names(cls)
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'Unknown config.model field(s) {unknown} for {task}; '
                     f'known: {sorted(fields)}.')
  for key in ('aspect_ratios', 'block_specs'):
    if kwargs.get(key) is not None:
      kwargs[key] = tuple(kwargs[key])
  kwargs['dtype'] = get_dtype(config.get('dtype', 'float32'))
  conv_impl.check(kwargs.get('conv_impl', 'auto'))
  norm_impl.check(kwargs.get('norm_impl', 'auto'))
  remat.check(kwargs.get('remat', 'none'))
  return cls(**kwargs)
