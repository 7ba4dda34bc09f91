"""The SpineNet scale-permuted backbone (Du et al., CVPR 2020) in Flax linen.

`ScalePermutedNetwork` is the core that SpineNet and SpineNet-Mobile
(`spinenet_mobile.py`) share, after Model Garden's
`official/vision/modeling/backbones/spinenet.py` `SpineNet`: a stem, then the
scale-permuted blocks (`_build_scale_permuted_network`: each block resamples
its two parents to its level and width, sums them with any unused block of the
same shape if it is an output, applies the activation and a block group),
then 1x1 conv-BN-activation endpoints to a common width (`_build_endpoints`).
A family's stem, resampling and block group are hooks.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import layers
from spinenet_jax import remat
from spinenet_jax import resample
from spinenet_jax import specs as specs_lib


def check_input_size(shape: Sequence[int], multiple: int, what: str) -> None:
  """Raises a ValueError if the image height or width is not a multiple."""
  h, w = shape[1:3]
  if h % multiple or w % multiple:
    raise ValueError(
        f'{what} needs image height and width divisible by {multiple} '
        f'(2^max_level); got {h}x{w}. Resize or pad the images, e.g. to '
        f'{math.ceil(h / multiple) * multiple}x'
        f'{math.ceil(w / multiple) * multiple}.')


class ScalePermutedNetwork(nn.Module):
  """Features {level: [B, H/2^level, W/2^level, C]} of a scale permutation.

  `model_id` picks the scaling; any scaling field set here
  (`endpoints_num_filters`, `filter_size_scale`, `block_repeats`, ...)
  overrides it. `block_specs` replaces the family's scale permutation (a
  sequence of (level, block_fn, (in0, in1), is_output)). Stochastic depth of
  scale-permuted block i is `stochastic_depth_rate * (i + 1) / len(specs)`.

  Subclasses set `family` and implement `_stem`, `_resample` and `_group`.
  """
  model_id: str = '49'
  block_specs: Sequence[Any] | None = None
  min_level: int = 3
  max_level: int = 7
  endpoints_num_filters: int | None = None
  filter_size_scale: float | None = None
  block_repeats: int | None = None
  activation: str | None = 'swish'
  stochastic_depth_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  resize_fallback: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'  # How kxk convs are lowered (`conv_impl.py`).
  norm_impl: str = 'auto'  # How batch norm is differentiated (`norm_impl.py`).
  remat: str = 'none'  # remat.MODES: what the backward recomputes.

  family = specs_lib.SPINENET  # Not a field: fixed per subclass.

  def setting(self, name: str) -> Any:
    """Field `name`, or the model id's scaling value where it is None."""
    value = getattr(self, name)
    if value is None:
      value = getattr(self.family.get_scaling(self.model_id), name)
    return value

  def plan(self) -> tuple[tuple[specs_lib.BlockSpec, ...],
                          list[specs_lib.Node], dict[int, int]]:
    """(block specs, built nodes, {endpoint level: feature index})."""
    return self.family.plan(self.block_specs,
                            self.setting('filter_size_scale'), self.min_level,
                            self.max_level)

  def _stem(self, x: jax.Array, train: bool,
            defs: layers.LayerDefs) -> list[jax.Array]:
    """The stem features (as many as `family.stem`)."""
    raise NotImplementedError

  def _resample(self, parent_block_fn: str, target_channels: int, name: str,
                defs: layers.LayerDefs) -> nn.Module:
    """A module mapping (parent, target size, train) to the target's shape."""
    raise NotImplementedError

  def _group(self, x: jax.Array, train: bool, block_fn: str, filters: int,
             strides: int, rate: float, name: str,
             defs: layers.LayerDefs) -> jax.Array:
    """`block_repeats` blocks named `name_r`, stochastic depth `rate`."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
    block_specs, nodes, endpoints = self.plan()
    top = max([n.level for n in nodes] + [self.max_level])
    if not self.resize_fallback:
      check_input_size(x.shape, 2**top, f'SpineNet-{self.model_id}')
    defs = layers.layer_defs(self.setting('activation'), self.dtype,
                             self.bn_momentum, self.bn_epsilon, self.conv_impl,
                             self.norm_impl)
    height, width = x.shape[1:3]

    remat.check(self.remat)
    uses = collections.Counter(j for n in nodes for j in (*n.inputs, *n.extras))
    uses.update(endpoints.values())
    copies = {}

    def add(j, feat):  # One copy per consumer: see `remat.fan_out`.
      copies[j] = list(remat.fan_out(feat, max(uses[j], 1)))

    def take(j):
      return copies[j].pop()

    for j, feat in enumerate(self._stem(x, train, defs)):
      add(j, feat)
    block_fns = {j: fn for j, (_, fn) in enumerate(self.family.stem)}
    for node in nodes:
      size = (math.ceil(height / 2**node.level),
              math.ceil(width / 2**node.level))
      parents = [
          self._resample(block_fns[j], node.channels,
                         f'resample{node.index}_{k}', defs)(
                             take(j), size, train)
          for k, j in enumerate(node.inputs)]
      parents += [take(j).astype(parents[0].dtype) for j in node.extras]
      y = layers.get_activation(defs.activation)(sum(parents))
      rate = self.stochastic_depth_rate * (node.spec_index + 1) / len(block_specs)
      add(node.index, self._group(y, train, node.block_fn, node.filters, 1,
                                  rate, f'block{node.index}', defs))
      block_fns[node.index] = node.block_fn

    n = self.setting('endpoints_num_filters')
    endpoint = remat.wrap(layers.ConvBN, self.remat == 'full')
    return {level: endpoint(n, 1, 1, defs.activation, defs.conv,
                            defs.norm, name=f'endpoint{level}')(
                                     take(endpoints[level]), train)
            for level in range(self.min_level, self.max_level + 1)}


class SpineNet(ScalePermutedNetwork):
  """SpineNet backbone: features {level: [B, H/2^level, W/2^level, C]}.

  `model_id` picks the scaling ('49S', '49', '96', '143', '143L', '190'); any
  of the scaling fields set here overrides it (`resample_alpha` too). The stem
  is a 7x7/2 conv (`stem_filters`, None: Model Garden's fixed 64 channels),
  a 3x3/2 max pool and two level-2 bottleneck groups.
  """
  resample_alpha: float | None = None
  stem_filters: int | None = None

  def _stem(self, x: jax.Array, train: bool,
            defs: layers.LayerDefs) -> list[jax.Array]:
    full = self.remat == 'full'
    x = remat.wrap(layers.ConvBN, full)(
        self.stem_filters or 64, 7, 2, defs.activation, defs.conv, defs.norm,
        name='stem_conv')(x, train)
    x = (jax.checkpoint(resample.max_pool) if full else resample.max_pool)(x)
    filters = int(specs_lib.FILTER_SIZE_MAP[2] *
                  self.setting('filter_size_scale'))
    feats = []
    for g in range(2):
      if feats:  # Block 0 is a feature and block 1's input.
        x, feats[-1] = remat.fan_out(feats[-1], 2)
      x = self._group(x, train, 'bottleneck', filters, 1, 0.0,
                      f'stem_block{g}', defs)
      feats.append(x)
    return feats

  def _resample(self, parent_block_fn: str, target_channels: int, name: str,
                defs: layers.LayerDefs) -> nn.Module:
    cls = remat.wrap(resample.Resample, self.remat == 'full', (2, 3))
    return cls(parent_block_fn, target_channels,
               self.setting('resample_alpha'), defs.activation,
               self.resize_fallback, defs.conv, defs.norm, name=name)

  def _group(self, x: jax.Array, train: bool, block_fn: str, filters: int,
             strides: int, rate: float, name: str,
             defs: layers.LayerDefs) -> jax.Array:
    # Model Garden's `SpineNet._block_group`: only the first block may stride
    # or project.
    cls = remat.wrap(layers.BLOCKS[block_fn], self.remat != 'none')
    out_ch = specs_lib.block_channels(block_fn, filters)
    use_projection = not (x.shape[-1] == out_ch and strides == 1)
    for r in range(self.setting('block_repeats')):
      x = cls(filters, strides if r == 0 else 1, use_projection and r == 0,
              rate, defs.activation, defs.conv, defs.norm,
              name=f'{name}_{r}')(x, train)
    return x
