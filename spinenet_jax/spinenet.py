"""The SpineNet scale-permuted backbone (Du et al., CVPR 2020) in Flax linen."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import layers
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


class SpineNet(nn.Module):
  """SpineNet backbone: features {level: [B, H/2^level, W/2^level, C]}.

  `model_id` picks the scaling ('49S', '49', '96', '143', '143L', '190'); any
  of the scaling fields set here overrides it. `block_specs` replaces the
  scale permutation (a sequence of (level, block_fn, (in0, in1), is_output)).
  """
  model_id: str = '49'
  block_specs: Sequence[Any] | None = None
  min_level: int = 3
  max_level: int = 7
  endpoints_num_filters: int | None = None
  filter_size_scale: float | None = None
  resample_alpha: float | None = None
  block_repeats: int | None = None
  activation: str = 'swish'
  stochastic_depth_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  resize_fallback: bool = False
  stem_filters: int | None = None  # None: 64, Model Garden's fixed width.
  dtype: Any = jnp.float32

  def setting(self, name: str):
    value = getattr(self, name)
    return getattr(specs_lib.get_scaling(self.model_id), name) if value is None else value

  def plan(self):
    block_specs = specs_lib.to_block_specs(
        specs_lib.SPINENET_BLOCK_SPECS if self.block_specs is None
        else self.block_specs)
    specs_lib.validate(block_specs, self.min_level, self.max_level)
    fss = self.setting('filter_size_scale')
    stem_ch = 4 * int(specs_lib.FILTER_SIZE_MAP[2] * fss)
    stem = [(2, 'bottleneck', stem_ch)] * 2
    nodes, endpoints = specs_lib.plan(block_specs, fss, self.min_level,
                                      self.max_level, stem)
    return block_specs, nodes, endpoints

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
    block_specs, nodes, endpoints = self.plan()
    top = max([n.level for n in nodes] + [self.max_level])
    if not self.resize_fallback:
      check_input_size(x.shape, 2**top, f'SpineNet-{self.model_id}')
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
              dtype=self.dtype)
    act = self.activation
    fss = self.setting('filter_size_scale')
    repeats = self.setting('block_repeats')
    height, width = x.shape[1:3]

    # Stem: 7x7/2 conv (64 channels unless set), max pool, two level-2 groups.
    x = layers.ConvBN(self.stem_filters or 64, 7, 2, act, name='stem_conv',
                      **kw)(x, train)
    x = resample.max_pool(x)
    feats, block_fns = [], []
    for g in range(2):
      x = layers.block_group(x, train, 'bottleneck',
                             int(specs_lib.FILTER_SIZE_MAP[2] * fss), repeats,
                             name=f'stem_block{g}', activation=act, **kw)
      feats.append(x)
      block_fns.append('bottleneck')

    # Scale-permuted blocks.
    feats = dict(enumerate(feats))
    block_fns = dict(enumerate(block_fns))
    for node in nodes:
      size = (math.ceil(height / 2**node.level), math.ceil(width / 2**node.level))
      parents = [
          resample.Resample(block_fns[j], node.channels,
                            self.setting('resample_alpha'), act,
                            resize_fallback=self.resize_fallback,
                            name=f'resample{node.index}_{k}', **kw)(
                                feats[j], size, train)
          for k, j in enumerate(node.inputs)]
      parents += [feats[j].astype(parents[0].dtype) for j in node.extras]
      y = layers.get_activation(act)(sum(parents))
      rate = self.stochastic_depth_rate * (node.spec_index + 1) / len(block_specs)
      feats[node.index] = layers.block_group(
          y, train, node.block_fn, node.filters, repeats,
          stochastic_depth_rate=rate, name=f'block{node.index}',
          activation=act, **kw)
      block_fns[node.index] = node.block_fn

    # Endpoints: 1x1 conv-BN-act to a common width.
    n = self.setting('endpoints_num_filters')
    return {level: layers.ConvBN(n, 1, 1, act, name=f'endpoint{level}', **kw)(
                feats[endpoints[level]], train)
            for level in range(self.min_level, self.max_level + 1)}
