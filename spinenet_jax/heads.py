"""RetinaNet and classification heads.

The RetinaNet head follows Model Garden's
`official/vision/modeling/heads/dense_prediction_heads.py` `RetinaNetHead`;
the classification head is SpineNet's (Du et al., CVPR 2020,
arXiv:1912.05027, section 4.2): all output levels upsampled to the finest and
averaged, then global pooling and a dense layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import layers
from spinenet_jax import resample
from spinenet_jax import sharding_utils

CLASS_PRIOR = 0.01


def _each_level(conv: nn.Module, xs: list[jax.Array]) -> list[jax.Array]:
  return [conv(x) for x in xs]


def _shared_over_levels(conv: nn.Module,
                        xs: list[jax.Array]) -> list[jax.Array]:
  """`conv` (a stride-1 'SAME' convolution) applied to every level, its
  parameter gradients summed over the levels on each device before the one
  reduction over the mesh (`sharding_utils.summed_param_grads`): a sharded
  step then reduces the head's weights once, not once per level."""
  pure = conv.clone(parent=None)

  def apply(params, x):
    return pure.apply({'params': params}, x)

  def forward(mdl, xs):
    return _each_level(mdl, xs), (mdl.variables['params'], xs)

  def backward(residuals, dys):
    params, xs = residuals
    dxs = [jax.vjp(lambda x: apply(params, x), x)[1](dy)[0]
           for x, dy in zip(xs, dys)]
    grads = sharding_utils.summed_param_grads(apply, params, xs, dys,
                                              halo=conv.kernel_size // 2)
    return {'params': grads}, dxs

  return nn.custom_vjp(_each_level, forward, backward)(conv, xs)


class RetinaNetHead(nn.Module):
  """Class and box towers with convs shared across levels.

  Each tower conv has one batch norm per level (Model Garden's
  `classnet-conv-norm_{level}_{i}`). Outputs per level: class logits
  `[B, H, W, A * num_classes]` (channel `a * num_classes + c`) and box deltas
  `[B, H, W, A * 4]` (channel `a * 4 + k`, k in dy, dx, dh, dw).
  """
  num_classes: int = 91
  num_anchors: int = 9
  num_convs: int = 4
  num_filters: int = 256
  activation: str = 'swish'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  # Keras SeparableConv2D (depthwise 3x3 + pointwise 1x1 with bias, default
  # glorot-uniform inits) for the tower convs and both predictors, as Model
  # Garden's `use_separable_conv` (SpineNet-Mobile).
  use_separable_conv: bool = False
  conv_impl: str = 'auto'  # How the convs are lowered (`conv_impl.py`).
  norm_impl: str = 'auto'  # How batch norm is differentiated (`norm_impl.py`).

  def _conv(self, features: int, kernel_init: Callable, bias_init: Callable,
            name: str) -> nn.Module:
    if self.use_separable_conv:
      return layers.SeparableConv(features, 3, bias_init=bias_init,
                                  dtype=self.dtype, impl=self.conv_impl,
                                  name=name)
    return layers.Conv(features, 3, use_bias=True, kernel_init=kernel_init,
                       bias_init=bias_init, dtype=self.dtype,
                       impl=self.conv_impl, name=name)

  def _tower(self, feats: dict[int, jax.Array], name: str, out: int,
             bias_init: Callable, train: bool) -> dict[int, jax.Array]:
    convs = [self._conv(self.num_filters, nn.initializers.normal(0.01),
                        nn.initializers.zeros, f'{name}_conv{i}')
             for i in range(self.num_convs)]
    predictor = self._conv(out, nn.initializers.normal(1e-5), bias_init,
                           f'{name}_predict')
    act = layers.get_activation(self.activation)
    levels, xs = list(feats), list(feats.values())
    # Training over a mesh applies each shared conv to all levels at once,
    # for its gradient reduction; the forward arithmetic is the same.
    sharded = (sharding_utils.data_shards(xs) > 1 or
               sharding_utils.model_shards(xs, 1) > 1)
    each = _shared_over_levels if train and sharded else _each_level
    for i, conv in enumerate(convs):
      xs = [act(layers.BatchNorm(self.bn_momentum, self.bn_epsilon,
                                 self.dtype, impl=self.norm_impl,
                                 name=f'{name}_norm{level}_{i}')(
                                     y, train))
            for level, y in zip(levels, each(conv, xs))]
    return {level: y.astype(jnp.float32)
            for level, y in zip(levels, each(predictor, xs))}

  @nn.compact
  def __call__(self, feats: dict[int, jax.Array],
               train: bool = False) -> dict[str, dict[int, jax.Array]]:
    prior = -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR)
    return {
        'cls_outputs': self._tower(
            feats, 'class', self.num_anchors * self.num_classes,
            nn.initializers.constant(prior), train),
        'box_outputs': self._tower(
            feats, 'box', self.num_anchors * 4, nn.initializers.zeros, train),
    }


class ClassificationHead(nn.Module):
  """Mean of all levels upsampled to the finest, global pool, dense layer.

  The TPU SpineNet classifier's `aggregation='all'`: from the coarsest level,
  nearest-resize to the next finer level and add, then divide by the number
  of levels.
  """
  num_classes: int = 1001
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[int, jax.Array],
               train: bool = False) -> jax.Array:
    levels = sorted(feats, reverse=True)
    x = feats[levels[0]]
    for level in levels[1:]:
      x = resample.resize_nearest(x, feats[level].shape[1:3], True) + feats[level]
    x = (x / len(levels)).astype(jnp.float32).mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    dtype=self.dtype, param_dtype=jnp.float32,
                    name='logits')(x).astype(jnp.float32)
