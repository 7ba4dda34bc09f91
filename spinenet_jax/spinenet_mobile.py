"""SpineNet-Mobile (Du et al., arXiv:2010.11426) in Flax linen.

The scale-permuted backbone of `spinenet.py` with MBConv blocks
(`layers.InvertedBottleneckBlock`, squeeze-excitation ratio 0.2, expansion 6),
resampling by depthwise convolutions without the 1x1 alpha reduction
(`resample.SeparableResample`) and a 3x3/2 stem conv. It follows TF2 Model
Garden's `backbones/spinenet_mobile.py` (reference section 2); where the TPU
`spinenet_mbconv.py` differs, Model Garden wins:

* squeeze-excitation uses relu inside and a hard-sigmoid gate (TPU: swish and
  sigmoid); `se_inner_activation` / `se_gating_activation` select either;
* the activation is the model id's Model Garden default: hard-swish for 49
  and 49S, swish for 49XS (the TPU YAML used swish throughout);
* stochastic depth rate of scale-permuted block i is `init * (i+1) / 16`;
  the stem blocks get none;
* depthwise kernels use Keras' fan-in (9 C, see `layers.depthwise_kernel_init`).

Model Garden's `_block_group` feeds every repeat the group's input and drops
the hard-sigmoid gate for repeats after the first; all its configs use
`block_repeats=1`, where this does not show. Here repeats are chained and all
use the same gate.

Model Garden clamps block levels to `max_level`; that only matters for
`max_level < 7`, where its default permutation then has duplicate outputs.
Here levels are kept and the input size must divide by 2^(highest level).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import layers
from spinenet_jax import resample
from spinenet_jax import specs as specs_lib
from spinenet_jax.spinenet import check_input_size


class SpineNetMobile(nn.Module):
  """SpineNet-Mobile backbone: features {level: [B, H/2^level, W/2^level, C]}.

  `model_id` picks the scaling: '49_mobile', '49S_mobile', '49XS_mobile' (Model
  Garden's '49', '49S', '49XS' are accepted too); any of the scaling fields set
  here overrides it. `block_specs` replaces the scale permutation (a sequence
  of (level, 'mbconv', (in0, in1), is_output); features 0 and 1 are the
  level-1 and level-2 stem blocks).
  """
  model_id: str = '49_mobile'
  block_specs: Sequence[Any] | None = None
  min_level: int = 3
  max_level: int = 7
  endpoints_num_filters: int | None = None
  filter_size_scale: float | None = None
  block_repeats: int | None = None
  se_ratio: float = 0.2
  expand_ratio: int = 6
  activation: str | None = None  # None: the model id's (hard_swish / swish).
  se_inner_activation: str = 'relu'
  se_gating_activation: str = 'hard_sigmoid'
  stochastic_depth_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  resize_fallback: bool = False
  dtype: Any = jnp.float32

  def setting(self, name: str):
    value = getattr(self, name)
    if value is None:
      value = getattr(specs_lib.get_mobile_scaling(self.model_id), name)
    return value

  def plan(self):
    block_specs = specs_lib.to_block_specs(
        specs_lib.SPINENET_MOBILE_BLOCK_SPECS if self.block_specs is None
        else self.block_specs)
    specs_lib.validate(block_specs, self.min_level, self.max_level,
                       block_fns=specs_lib.MOBILE_BLOCK_FNS)
    fss = self.setting('filter_size_scale')
    fmap = specs_lib.MOBILE_FILTER_SIZE_MAP
    stem = [(1, 'mbconv', int(fmap[1] * fss)), (2, 'mbconv', int(fmap[2] * fss))]
    nodes, endpoints = specs_lib.plan(
        block_specs, fss, self.min_level, self.max_level, stem,
        filter_size_map=fmap, channels_fn=specs_lib.mobile_channels)
    return block_specs, nodes, endpoints

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
    block_specs, nodes, endpoints = self.plan()
    top = max([n.level for n in nodes] + [self.max_level])
    if not self.resize_fallback:
      check_input_size(x.shape, 2**top, f'SpineNet-{self.model_id}')
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
              dtype=self.dtype)
    act = self.setting('activation')
    fss = self.setting('filter_size_scale')
    repeats = self.setting('block_repeats')
    fmap = specs_lib.MOBILE_FILTER_SIZE_MAP
    height, width = x.shape[1:3]

    def group(y, out_filters, strides, rate, name):
      for r in range(repeats):
        y = layers.InvertedBottleneckBlock(
            out_filters, self.expand_ratio, strides if r == 0 else 1,
            se_ratio=self.se_ratio, stochastic_depth_rate=rate,
            activation=act, se_inner_activation=self.se_inner_activation,
            se_gating_activation=self.se_gating_activation,
            name=f'{name}_{r}', **kw)(y, train)
      return y

    # Stem: 3x3/2 conv, then MBConv to level 1 (stride 1) and level 2
    # (stride 2); both are features. No stochastic depth in the stem.
    x = layers.ConvBN(int(fmap[0] * fss), 3, 2, act, name='stem_conv',
                      **kw)(x, train)
    feats = {}
    for g, strides in enumerate((1, 2)):
      x = group(x, int(fmap[g + 1] * fss), strides, 0.0, f'stem_block{g}')
      feats[g] = x

    # Scale-permuted blocks.
    for node in nodes:
      size = (math.ceil(height / 2**node.level),
              math.ceil(width / 2**node.level))
      parents = [
          resample.SeparableResample(
              node.channels, act, resize_fallback=self.resize_fallback,
              name=f'resample{node.index}_{k}', **kw)(feats[j], size, train)
          for k, j in enumerate(node.inputs)]
      parents += [feats[j].astype(parents[0].dtype) for j in node.extras]
      y = layers.get_activation(act)(sum(parents))
      rate = self.stochastic_depth_rate * (node.spec_index + 1) / len(block_specs)
      feats[node.index] = group(y, node.filters, 1, rate, f'block{node.index}')

    # Endpoints: 1x1 conv-BN-act to a common width.
    n = self.setting('endpoints_num_filters')
    return {level: layers.ConvBN(n, 1, 1, act, name=f'endpoint{level}', **kw)(
                feats[endpoints[level]], train)
            for level in range(self.min_level, self.max_level + 1)}
