"""How training-mode batch norm is differentiated: by JAX, or written out.

Flax's `nn.BatchNorm` in training mode normalises with the batch's mean
and variance (E[x^2] - E[x]^2), and JAX derives its gradient through both
reductions. XLA:CPU compiles that derivation to six passes over the
activation after the activation function's gradient: three reductions
where two suffice (the third is the bias gradient, scaled), and two
elementwise passes that write out `x - mean` and
`dy * scale * rsqrt(var + eps)` only so that they can be reduced.

'fused' is the same forward arithmetic with the textbook gradient written
out (a custom VJP, as cuDNN's and oneDNN's batch-norm backward): two
per-channel sums, `sum(dy)` and `sum(dy * x)`, then one elementwise pass,

  dbias  = sum(dy)
  dscale = r * (sum(dy * x) - mean * sum(dy)),   r = rsqrt(var + eps)
  dx     = a * dy - k * x + (k * mean - a * dbias / n),
           a = scale * r,  k = a * r * dscale / n

(n values per channel). It keeps `x` for the backward pass, as flax's
does. (Reducing `dy * (x - mean)` instead was no more accurate against
float64 and 0.8% slower.) On SpineNet-49's COCO training step on CPU this
cut the step by 3-4% at 256 and 640 px and its compile time by about 10%
(benchmarks/README.md, "Batch norm with its gradient written out").
Cotangents of the returned mean and variance (zero in training, where they
only feed the moving averages) are honoured too.

`config.model.norm_impl` chooses: 'auto' ('fused' on CPU, 'flax'
elsewhere: it is unmeasured on GPU/TPU), 'flax' or 'fused'. Inference
(moving statistics) is always flax's. Both give the same outputs and
gradients up to float rounding (tests/test_norm_impl.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

IMPLS = ('flax', 'fused')
CHOICES = ('auto',) + IMPLS


def check(impl: str) -> str:
  """`impl` if it is a known choice, else a ValueError that lists them."""
  if impl not in CHOICES:
    raise ValueError(f'norm_impl={impl!r} is not one of {CHOICES}; use '
                     "'auto' unless you are comparing implementations.")
  return impl


def resolve(impl: str) -> str:
  """The implementation `impl` stands for on the default backend."""
  if check(impl) != 'auto':
    return impl
  return 'fused' if jax.default_backend() == 'cpu' else 'flax'


def _reduced_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon):
  """Flax's training-mode arithmetic (fast variance, clipped at zero)."""
  axes = _reduced_axes(x)
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = xf.mean(axes)
  var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
  r = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * (r * scale) + bias
  return (y, mean, var), (x, mean, r, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm of `x` over all axes but the last, with batch statistics:
  `(y, mean, var)`, y in float32 (or wider), mean and var per channel."""
  return _forward(x, scale, bias, epsilon)[0]


def _fwd(x, scale, bias, epsilon):
  return _forward(x.value, scale.value, bias.value, epsilon)


def _bwd(epsilon, res, cts):
  del epsilon  # Only through r, saved.
  x, mean, r, scale = res
  dy, dmean, dvar = cts
  axes = _reduced_axes(x)
  n = x.size // x.shape[-1]
  xf = x.astype(mean.dtype)
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(x.shape, mean.dtype)
  sum_dy = dy.sum(axes)
  dscale = r * ((dy * xf).sum(axes) - mean * sum_dy)
  a = scale * r
  k = a * r * dscale / n
  dx = a * dy - k * xf + (k * mean - a * sum_dy / n)
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / n
  if not isinstance(dvar, SymbolicZero):
    dx = dx + (2.0 / n) * dvar * (xf - mean)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), sum_dy.astype(
      scale.dtype)


batch_norm_train.defvjp(_fwd, _bwd, symbolic_zeros=True)


class FusedBatchNorm(nn.Module):
  """Training-mode `nn.BatchNorm` over the last axis with the gradient of
  `batch_norm_train`: the same variables ('scale', 'bias'; batch_stats
  'mean', 'var'), the same moving-average update, float32 statistics."""
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, c, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, c, jnp.float32)
    scale = self.param('scale', self.scale_init, c, self.param_dtype)
    bias = self.param('bias', self.bias_init, c, self.param_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))
