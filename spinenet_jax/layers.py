"""Building blocks: convolution, conv-BN-activation, residual, bottleneck and
MBConv blocks, stochastic depth.

Semantics follow TF2 Model Garden (`official/vision/modeling/layers/
nn_blocks.py` `BottleneckBlock`, `ResidualBlock`, `InvertedBottleneckBlock`;
`nn_layers.py` `SqueezeExcitation`, `StochasticDepth`): bias-free convs with a
fan-in truncated-normal init (Keras 'VarianceScaling'), 'SAME' padding, batch
norm with momentum 0.99 and epsilon 1e-3.

Blocks take their convolution and normalisation as module constructors
(`conv`, `norm`, `depthwise_conv`), as flax's ImageNet ResNet example does: a
network builds `functools.partial(BatchNorm, momentum=..., dtype=...)` once
(`layer_defs`) and hands it to every block.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import conv_impl
from spinenet_jax import norm_impl

Dtype = Any
ModuleDef = Any  # A Module class or a functools.partial of one.

conv_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal')


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """Model Garden's hard sigmoid: relu6(x + 3) / 6."""
  return jax.nn.relu6(x + 3.0) * 0.16667


def hard_swish(x: jax.Array) -> jax.Array:
  """Model Garden's hard swish: x * relu6(x + 3) / 6 (exactly 1/6 here,
  unlike its hard sigmoid's 0.16667)."""
  return x * jax.nn.relu6(x + 3.0) * (1.0 / 6.0)


ACTIVATIONS = {
    'relu': jax.nn.relu,
    'swish': jax.nn.swish,
    'hard_swish': hard_swish,
    'sigmoid': jax.nn.sigmoid,
    'hard_sigmoid': hard_sigmoid,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called `name`."""
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; expected one of '
                     f'{sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def pointwise(x: jax.Array, kernel: jax.Array,
              impl: str = 'auto') -> jax.Array:
  """A 1x1 convolution of NHWC `x` (or a `[B, C]` vector) with `[C, D]`.

  A matmul over channels (several times faster than XLA:CPU's convolution;
  benchmarks/README.md), except on a 1x1 map, where it is XLA's convolution
  (the same numbers): TFLite's converter turns a matmul of a 1x1 map into a
  rank-4 batch matmul that it then rejects. `impl` picks how its gradient is
  computed (`conv_impl.conv1x1`: on CPU `conv_impl.matmul`'s).
  """
  if x.ndim == 2:
    return x @ kernel
  if x.shape[1:3] == (1, 1):
    return jax.lax.conv_general_dilated(
        x, kernel[None, None], (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return conv_impl.conv1x1(x, kernel, impl)


class Conv(nn.Module):
  """2-D convolution with 'SAME' padding and an HWIO `kernel`.

  1x1 convolutions run as a matmul over channels: on XLA:CPU that is several
  times faster than `conv_general_dilated` (benchmarks/README.md) and the same
  on TPU/GPU. `impl` lowers the convolutions (`conv_impl.py`: on CPU 'auto'
  gives 1x1 ones written-out gradients and runs small feature maps as im2col
  matmuls).
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  use_bias: bool = False
  kernel_init: Callable = conv_kernel_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1:
      if s > 1:  # TF 'SAME' with a 1x1 kernel pads nothing: plain subsampling.
        x = x[:, ::s, ::s, :]
      y = pointwise(x, kernel[0, 0], self.impl)
    else:
      y = conv_impl.conv(x, kernel, s, self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _depthwise(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


# Keras initialises a DepthwiseConv2D kernel, shape [k, k, C, 1], with the same
# fan rules as a full conv: fan_in = k*k*C, not k*k. Model Garden's
# 'VarianceScaling' depthwise kernels therefore start with std
# sqrt(1 / (9 C)), and we do the same for parity (our HWIO kernel is
# [k, k, 1, C], hence the swapped axes). Batch norm follows every depthwise
# conv, so the forward pass is insensitive to this scale; what it changes is
# the step size relative to the weights. Pass
# `kernel_init=conv_kernel_init` to get the true fan-in (k*k) instead.
depthwise_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal', in_axis=-1, out_axis=-2)

# Keras SeparableConv2D defaults: glorot_uniform for both kernels, with the
# depthwise fans computed Keras-style as above (fan_in k*k*C, fan_out k*k).
separable_depthwise_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=-1, out_axis=-2)
separable_pointwise_init = nn.initializers.glorot_uniform()


class DepthwiseConv(nn.Module):
  """Depthwise conv (depth multiplier 1), 'SAME' padding, no bias.

  The kernel is `depthwise_kernel` [k, k, 1, C]. The name differs from `kernel`
  on purpose: Model Garden does not L2-regularise depthwise kernels
  (`regularize_depthwise=False`; resampling passes `kernel_regularizer`, which
  Keras' DepthwiseConv2D ignores), so a weight-decay mask on leaves named
  `kernel` reproduces it.
  """
  kernel_size: int = 3
  strides: int = 1
  kernel_init: Callable = depthwise_kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('depthwise_kernel', self.kernel_init, (k, k, 1, c),
                        jnp.float32)
    return _depthwise(x.astype(self.dtype), kernel.astype(self.dtype),
                      self.strides)


class BatchNorm(nn.Module):
  """Batch norm with Model Garden defaults; statistics kept in float32.

  In training, `impl` picks how its gradient is computed (`norm_impl.py`:
  on CPU 'auto' writes it out); the variables are flax's either way."""
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
              param_dtype=jnp.float32, scale_init=self.scale_init, name='bn')
    if train and norm_impl.resolve(self.impl) == 'fused':
      return norm_impl.FusedBatchNorm(**kw)(x)
    return nn.BatchNorm(use_running_average=not train, **kw)(x)


class LayerDefs(NamedTuple):
  """What every layer of one network shares: its activation and its conv,
  norm and depthwise-conv constructors (partials carrying dtype and the batch
  norm settings)."""
  activation: str
  conv: ModuleDef
  norm: ModuleDef
  depthwise_conv: ModuleDef


def layer_defs(activation: str, dtype: Dtype = jnp.float32,
               bn_momentum: float = 0.99,
               bn_epsilon: float = 1e-3,
               conv_impl: str = 'auto',
               norm_impl: str = 'auto') -> LayerDefs:
  """The `LayerDefs` of a network in `dtype` with these batch norm settings,
  kxk convolutions lowered by `conv_impl` (see `Conv`) and batch norm
  differentiated by `norm_impl` (see `BatchNorm`)."""
  return LayerDefs(
      activation, functools.partial(Conv, dtype=dtype, impl=conv_impl),
      functools.partial(BatchNorm, momentum=bn_momentum, epsilon=bn_epsilon,
                        dtype=dtype, impl=norm_impl),
      functools.partial(DepthwiseConv, dtype=dtype))


class ConvBN(nn.Module):
  """Conv -> norm -> optional activation (submodules `conv` and `norm`)."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  activation: str | None = 'relu'
  conv: ModuleDef = Conv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.conv(self.features, self.kernel_size, self.strides,
                  name='conv')(x)
    x = self.norm(name='norm')(x, train)
    return get_activation(self.activation)(x) if self.activation else x


class DepthwiseConvBN(nn.Module):
  """Depthwise conv -> norm -> optional activation."""
  kernel_size: int = 3
  strides: int = 1
  activation: str | None = 'relu'
  kernel_init: Callable = depthwise_kernel_init
  conv: ModuleDef = DepthwiseConv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.conv(self.kernel_size, self.strides, self.kernel_init,
                  name='conv')(x)
    x = self.norm(name='norm')(x, train)
    return get_activation(self.activation)(x) if self.activation else x


class StochasticDepth(nn.Module):
  """Drops the whole residual branch per example with probability `rate`.

  Active only when `train` is true; uses the 'dropout' RNG stream.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate <= 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    u = jax.random.uniform(self.make_rng('dropout'), shape, jnp.float32)
    mask = jnp.floor(keep + u)
    return (x / keep * mask).astype(x.dtype)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 expansion) residual block (Model Garden)."""
  filters: int
  strides: int = 1
  use_projection: bool = False
  stochastic_depth_rate: float = 0.0
  activation: str = 'relu'
  conv: ModuleDef = Conv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_bn = functools.partial(ConvBN, conv=self.conv, norm=self.norm)
    act = self.activation
    shortcut = x
    if self.use_projection:
      shortcut = conv_bn(4 * self.filters, 1, self.strides, None,
                         name='shortcut')(x, train)
    y = conv_bn(self.filters, 1, 1, act, name='conv1')(x, train)
    y = conv_bn(self.filters, 3, self.strides, act, name='conv2')(y, train)
    y = conv_bn(4 * self.filters, 1, 1, None, name='conv3')(y, train)
    y = StochasticDepth(self.stochastic_depth_rate)(y, train)
    return get_activation(act)(y + shortcut.astype(y.dtype))


class ResidualBlock(nn.Module):
  """3x3 -> 3x3 residual block (Model Garden)."""
  filters: int
  strides: int = 1
  use_projection: bool = False
  stochastic_depth_rate: float = 0.0
  activation: str = 'relu'
  conv: ModuleDef = Conv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_bn = functools.partial(ConvBN, conv=self.conv, norm=self.norm)
    act = self.activation
    shortcut = x
    if self.use_projection:
      shortcut = conv_bn(self.filters, 1, self.strides, None,
                         name='shortcut')(x, train)
    y = conv_bn(self.filters, 3, self.strides, act, name='conv1')(x, train)
    y = conv_bn(self.filters, 3, 1, None, name='conv2')(y, train)
    y = StochasticDepth(self.stochastic_depth_rate)(y, train)
    return get_activation(act)(y + shortcut.astype(y.dtype))


BLOCKS = {'bottleneck': BottleneckBlock, 'residual': ResidualBlock}

# ---------------------------------------------------------------------------
# SpineNet-Mobile building blocks (Du et al., arXiv:2010.11426; Model
# Garden's `InvertedBottleneckBlock` and `SqueezeExcitation`).

class SeparableConv(nn.Module):
  """Keras SeparableConv2D: depthwise k x k, then pointwise 1x1 with bias.

  Parameters `depthwise_kernel` [k, k, 1, C], `pointwise_kernel` [1, 1, C, F]
  and `bias` [F]; Keras' default glorot-uniform inits. Model Garden's
  separable RetinaNet head sets no kernel regularizer on these, which the
  names (not `kernel`) reproduce under a `kernel`-only weight-decay mask.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  depthwise_init: Callable = separable_depthwise_init
  pointwise_init: Callable = separable_pointwise_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  impl: str = 'auto'  # The pointwise conv's gradient (`pointwise`).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    dw = self.param('depthwise_kernel', self.depthwise_init, (k, k, 1, c),
                    jnp.float32)
    pw = self.param('pointwise_kernel', self.pointwise_init,
                    (1, 1, c, self.features), jnp.float32)
    y = _depthwise(x.astype(self.dtype), dw.astype(self.dtype), self.strides)
    y = pointwise(y, pw[0, 0].astype(self.dtype), self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class SqueezeExcitation(nn.Module):
  """Model Garden's SqueezeExcitation (nn_layers.py).

  Global average pool -> 1x1 conv to `max(1, int(in_filters * se_ratio))`
  with bias -> `activation` -> 1x1 conv to the input's channels with bias ->
  `gating_activation` -> multiply. `in_filters` is the block's input width
  (Model Garden's `expand_se_in_filters=False`), not the expanded width that
  is gated. Model Garden's SpineNet-Mobile uses relu inside and a
  hard-sigmoid gate; the TPU code used swish and sigmoid.
  """
  in_filters: int
  se_ratio: float = 0.2
  activation: str = 'relu'
  gating_activation: str = 'hard_sigmoid'
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    reduced = max(1, int(self.in_filters * self.se_ratio))
    # [B, C] and 2-D matmuls, not [B, 1, 1, C] (the same numbers): TFLite's
    # converter rejects a rank-4 batch matmul of a 1x1 map.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = self.conv(reduced, 1, use_bias=True, name='reduce')(s)
    s = get_activation(self.activation)(s)
    s = self.conv(x.shape[-1], 1, use_bias=True, name='expand')(s)
    s = get_activation(self.gating_activation)(s)
    return x * s[:, None, None, :].astype(x.dtype)


class InvertedBottleneckBlock(nn.Module):
  """MBConv: Model Garden's InvertedBottleneckBlock as SpineNet-Mobile uses it.

  expand 1x1 (x `expand_ratio`, skipped if <= 1) -> BN -> act -> depthwise
  k x k (stride) -> BN -> act -> squeeze-excitation -> project 1x1 -> BN (no
  activation). Residual add, with stochastic depth on the branch, only when
  the input and output widths match and the stride is 1; no activation after
  the add.
  """
  out_filters: int
  expand_ratio: int = 6
  strides: int = 1
  kernel_size: int = 3
  se_ratio: float | None = 0.2
  stochastic_depth_rate: float = 0.0
  activation: str = 'relu'
  se_inner_activation: str = 'relu'
  se_gating_activation: str = 'hard_sigmoid'
  depthwise_init: Callable = depthwise_kernel_init
  conv: ModuleDef = Conv
  depthwise_conv: ModuleDef = DepthwiseConv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_bn = functools.partial(ConvBN, conv=self.conv, norm=self.norm)
    act = self.activation
    in_filters = x.shape[-1]
    y = x
    if self.expand_ratio > 1:
      y = conv_bn(in_filters * self.expand_ratio, 1, 1, act,
                  name='expand')(y, train)
    y = DepthwiseConvBN(self.kernel_size, self.strides, act,
                        self.depthwise_init, self.depthwise_conv, self.norm,
                        name='depthwise')(y, train)
    if self.se_ratio and 0 < self.se_ratio <= 1:
      y = SqueezeExcitation(in_filters, self.se_ratio,
                            self.se_inner_activation,
                            self.se_gating_activation, self.conv,
                            name='se')(y)
    y = conv_bn(self.out_filters, 1, 1, None, name='project')(y, train)
    if in_filters == self.out_filters and self.strides == 1:
      y = StochasticDepth(self.stochastic_depth_rate)(y, train)
      y = y + x.astype(y.dtype)
    return y
