"""SpineNet-Mobile (Du et al., arXiv:2010.11426) in Flax linen.

The scale-permuted core of `spinenet.py` with MBConv blocks
(`layers.InvertedBottleneckBlock`, squeeze-excitation ratio 0.2, expansion 6),
resampling by depthwise convolutions without the 1x1 alpha reduction
(`resample.SeparableResample`) and a 3x3/2 stem conv. It follows TF2 Model
Garden's `official/vision/modeling/backbones/spinenet_mobile.py`
`SpineNetMobile`; where the TPU `spinenet_mbconv.py` differs, Model Garden
wins:

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

import functools

import flax.linen as nn
import jax

from spinenet_jax import layers
from spinenet_jax import remat
from spinenet_jax import resample
from spinenet_jax import specs as specs_lib
from spinenet_jax.spinenet import ScalePermutedNetwork


class SpineNetMobile(ScalePermutedNetwork):
  """SpineNet-Mobile backbone: features {level: [B, H/2^level, W/2^level, C]}.

  `model_id` picks the scaling: '49_mobile', '49S_mobile', '49XS_mobile' (Model
  Garden's '49', '49S', '49XS' are accepted too); any of the scaling fields set
  here overrides it. `block_specs` replaces the scale permutation (a sequence
  of (level, 'mbconv', (in0, in1), is_output); features 0 and 1 are the
  level-1 and level-2 stem blocks). `activation=None` is the model id's
  (hard_swish / swish).
  """
  model_id: str = '49_mobile'
  activation: str | None = None
  se_ratio: float = 0.2
  expand_ratio: int = 6
  se_inner_activation: str = 'relu'
  se_gating_activation: str = 'hard_sigmoid'

  family = specs_lib.SPINENET_MOBILE

  def _stem(self, x: jax.Array, train: bool,
            defs: layers.LayerDefs) -> list[jax.Array]:
    # A 3x3/2 conv, then MBConv to level 1 (stride 1) and level 2 (stride 2);
    # both are features. No stochastic depth in the stem.
    fmap = self.family.filter_size_map
    fss = self.setting('filter_size_scale')
    x = remat.wrap(layers.ConvBN, self.remat == 'full')(
        int(fmap[0] * fss), 3, 2, defs.activation, defs.conv, defs.norm,
        name='stem_conv')(x, train)
    feats = []
    for g, strides in enumerate((1, 2)):
      if feats:  # Block 0 is a feature and block 1's input.
        x, feats[-1] = remat.fan_out(feats[-1], 2)
      x = self._group(x, train, 'mbconv', int(fmap[g + 1] * fss), strides,
                      0.0, f'stem_block{g}', defs)
      feats.append(x)
    return feats

  def _resample(self, parent_block_fn: str, target_channels: int, name: str,
                defs: layers.LayerDefs) -> nn.Module:
    del parent_block_fn  # No alpha reduction: the parent's width is unused.
    cls = remat.wrap(resample.SeparableResample, self.remat == 'full',
                       (2, 3))
    return cls(target_channels, defs.activation, self.resize_fallback,
               defs.conv, defs.depthwise_conv, defs.norm, name=name)

  def _group(self, x: jax.Array, train: bool, block_fn: str, filters: int,
             strides: int, rate: float, name: str,
             defs: layers.LayerDefs) -> jax.Array:
    del block_fn  # Always 'mbconv'.
    block = functools.partial(
        remat.wrap(layers.InvertedBottleneckBlock, self.remat != 'none'),
        filters, self.expand_ratio,
        se_ratio=self.se_ratio, stochastic_depth_rate=rate,
        activation=defs.activation,
        se_inner_activation=self.se_inner_activation,
        se_gating_activation=self.se_gating_activation, conv=defs.conv,
        depthwise_conv=defs.depthwise_conv, norm=defs.norm)
    for r in range(self.setting('block_repeats')):
      x = block(strides if r == 0 else 1, name=f'{name}_{r}')(x, train)
      x = remat.gradient_barrier(x)  # The same gradients with remat.
    return x
