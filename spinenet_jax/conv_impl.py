"""How a kxk 'SAME' convolution is lowered: XLA's convolution or a matmul.

On XLA:CPU, `conv_general_dilated` runs well on large feature maps (its
convolutions go to YNNPACK) but badly on small ones. A 3x3 convolution of a
map smaller than its kernel (SpineNet's level 7 at 256 px is 2x2) is
rewritten with a trimmed window in a batch-as-feature layout that runs 3-10x
slower than the same MACs as a matmul, and wide convolutions (the RetinaNet
head's 256 channels) of maps up to 16x16 run about 2x slower, forward and
backward (benchmarks/README.md, "Small convolutions"). On CPU those run as an
im2col matmul instead: the k*k shifted, strided views of the padded input are
concatenated on the channel axis and multiplied by the kernel reshaped to
[k*k*C_in, C_out]; its gradients are matmuls too. On larger maps XLA's
convolution and input gradient are fast, but its kernel gradient is not
(16-22 GMAC/s for the RetinaNet head's convolutions at 640 px, a third of an
im2col matmul's speed); from 128 input channels on, and for the 7x7 stem
on large inputs (whose kernel gradient XLA runs on one thread),
'im2col_grad' keeps XLA's convolution and computes the kernel gradient as
that matmul (`conv_im2col_grad`). Its patches are built channel-major,
from x transposed once, as the matmul needs them: built pixel-major, XLA
would copy all k*k times more values into that layout (SpineNet-49's
training step at 640 px: 3.46 -> 3.24 s). Narrow 3x3 convolutions, and
every convolution on GPU/TPU, keep XLA's own: there im2col is slower and
compiles more slowly. And 3x3 stride-1 convolutions of maps from 16x16 on,
with 128 input channels or more, run as Winograd F(4x4, 3x3) matmuls
(`winograd.py`): 4x fewer multiply-adds, gradients included, which took
SpineNet-49's training step at 640 px from 3.33 to 2.50 s and at 256 px
from 0.540 to 0.463 s (in-process A/B).

Every matmul of a convolution has its gradients written out (`matmul` for
1x1 kernels, `conv_im2col` for kxk ones, whose kernel gradient takes
channel-major patches rebuilt from x as 'im2col_grad' does: train256
0.572 -> 0.557 s): JAX derives the same two matmuls, but the order of its
kernel-gradient contraction makes XLA:CPU first copy the output gradient of
every 1x1 convolution to channel-major, a strided transpose that cost more
than the matmuls themselves (the demo's training step: 315 -> 253 ms, A/B in
one process). On CPU 'auto' therefore runs 1x1 convolutions as `matmul`;
elsewhere they stay the einsum JAX differentiates.

The choice is made here and nowhere else: `resolve('auto', ...)` picks by
backend, kernel size, stride, map size and width; `config.model.conv_impl`
('auto', 'xla', 'im2col', 'im2col_grad', 'winograd') forces one for every
convolution ('im2col' or 'im2col_grad' of a 1x1 kernel is `matmul`, 'xla'
the einsum JAX differentiates; 'winograd' forces every 3x3 stride-1
convolution and leaves the others to 'auto'). All give the same results up
to float rounding (tests/test_conv_impl.py; Winograd's is the largest, 6e-6
of the output's range at 256 channels against XLA's 6e-7).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from spinenet_jax import windows
from spinenet_jax import winograd

IMPLS = ('xla', 'im2col', 'im2col_grad', 'winograd')
CHOICES = ('auto',) + IMPLS
# 'auto' on CPU runs im2col for maps smaller than the kernel, and for maps of
# at most IM2COL_MAX_PIXELS pixels with at least IM2COL_MIN_CHANNELS input
# channels (measured crossovers: 16x16 is 1.2x faster as im2col at 256
# channels, 32x32 1.3-1.6x slower; 128 channels is a wash).
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 256
# Every other convolution with at least GRAD_MIN_CHANNELS input channels runs
# 'im2col_grad' on CPU: XLA's forward and input gradient, its kernel gradient
# as an im2col matmul (2x faster at 256 channels, 3.5x for the class
# predictor's 819 outputs, 1.3x at 128; 2x slower at 64).
GRAD_MIN_CHANNELS = 128
# So does the 7x7 stem (kernels of at least GRAD_MIN_KERNEL) on images of at
# least GRAD_MIN_PIXELS (height x width): XLA:CPU runs its kernel gradient
# on one thread, and it slows down faster than the pixels grow (batch 2:
# 4.4 / 14.0 / 36.6 / 66 ms at 256 / 384 / 512 / 640 px, as the matmul
# 4.8 / 8.6 / 16.6 / 27 ms). At 256 px (the demo's 4 images) the matmul was
# no faster in the step. Per image, not per batch, so that the choice does
# not change with the batch size or the mesh.
GRAD_MIN_KERNEL = 7
GRAD_MIN_PIXELS = 384 * 384
# 3x3 stride-1 convolutions of maps of at least WINOGRAD_MIN_PIXELS (h x w)
# with at least WINOGRAD_MIN_CHANNELS input channels run as Winograd
# F(4x4, 3x3) on CPU (`winograd.conv`). Forward and gradients, alone: 1.6x
# faster than the other lowerings at 16x16 and 256 channels, 2.2x for the
# RetinaNet head at 80x80, 2.7x for its class predictor; slower from 10x10
# down. Narrower convolutions gain alone too (64 channels at 160x160: 1.9x)
# but not in a training step: the demo's (16-64 channels) was 2% slower and
# SpineNet-49's at 640 px no faster with its 64-channel ones included.
WINOGRAD_MIN_PIXELS = 16 * 16
WINOGRAD_MIN_CHANNELS = 128


def check(impl: str) -> str:
  """`impl` if it is a known choice, else a ValueError that lists them."""
  if impl not in CHOICES:
    raise ValueError(f'conv_impl={impl!r} is not one of {CHOICES}; use '
                     "'auto' unless you are comparing lowerings.")
  return impl


def resolve(impl: str, shape: Sequence[int], kernel_size: int,
            strides: int = 1) -> str:
  """The lowering `impl` stands for on an NHWC input of `shape`.

  'winograd' applies to 3x3 stride-1 convolutions only; forced, it leaves
  every other convolution to 'auto'.
  """
  winograd_fits = kernel_size == 3 and strides == 1
  if check(impl) == 'winograd' and not winograd_fits:
    impl = 'auto'
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  if kernel_size == 1:
    return 'im2col'
  h, w, c = shape[1:]
  if (winograd_fits and h * w >= WINOGRAD_MIN_PIXELS and
      c >= WINOGRAD_MIN_CHANNELS):
    return 'winograd'
  tiny = h < kernel_size or w < kernel_size
  wide = h * w <= IM2COL_MAX_PIXELS and c >= IM2COL_MIN_CHANNELS
  if tiny or wide:
    return 'im2col'
  stem = kernel_size >= GRAD_MIN_KERNEL and h * w >= GRAD_MIN_PIXELS
  return 'im2col_grad' if c >= GRAD_MIN_CHANNELS or stem else 'xla'


def _views(x: jax.Array, k: int, s: int, axes: str = 'NHWC'
           ) -> list[jax.Array]:
  """The k*k shifted, strided views of x padded as TF 'SAME' pads it; x's
  dimensions are in the order `axes` ('NHWC' or 'CNHW')."""
  size = (x.shape[axes.index('H')], x.shape[axes.index('W')])
  pads = jax.lax.padtype_to_pads(size, (k, k), (s, s), 'SAME')
  return windows.strided(x, k, s, pads, axes)


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` over the last axis of NHWC `x` ([C, D] kernel), with its
  gradients written out: dx = dy @ kernel^T, dkernel = x^T @ dy summed over
  batch and pixels (the contraction order XLA:CPU runs without transposes)."""
  return jnp.einsum('bhwc,cd->bhwd', x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(res, dy):
  x, kernel = res
  return (jnp.einsum('bhwd,cd->bhwc', dy, kernel),
          jnp.einsum('bhwc,bhwd->cd', x, dy))


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, impl: str = 'auto') -> jax.Array:
  """1x1 convolution of NHWC `x` with a [C, D] `kernel`, a matmul over
  channels: `matmul` (gradients written out) or, for 'xla', the einsum JAX
  differentiates."""
  if resolve(impl, x.shape, 1) == 'xla':
    return jnp.einsum('bhwc,cd->bhwd', x, kernel)
  return matmul(x, kernel)


def _im2col(x: jax.Array, k: int, s: int) -> jax.Array:
  """The patches of `x` for a k x k, stride-s 'SAME' convolution:
  [B, H/s, W/s, k*k*C], the views concatenated on channels."""
  return jnp.concatenate(_views(x, k, s), axis=-1)


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _im2col_t(x: jax.Array, k: int, s: int) -> jax.Array:
  """The patches of `x` channel-major: [k*k*C, B*H/s*W/s], rows in the
  order of an HWIO kernel's (i, j, c). Built from x transposed once to
  [C, B, H, W], so that the kernel gradient's matmul needs no transposed
  copy of the k*k times larger patches."""
  views = _views(jnp.transpose(x, (3, 0, 1, 2)), k, s, axes='CNHW')
  return jnp.stack(views).reshape(k * k * x.shape[3], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_im2col_grad(x: jax.Array, kernel: jax.Array,
                     strides: int) -> jax.Array:
  """XLA's convolution and input gradient, with the kernel gradient as
  one matmul of the channel-major im2col patches and the output gradient
  (XLA:CPU runs wide kernel gradients at a third of a matmul's speed or
  less, and the stem's on one thread)."""
  return _xla_conv(x, kernel, strides)


def _conv_im2col_grad_fwd(x, kernel, strides):
  return _xla_conv(x, kernel, strides), (x, kernel)


def _conv_im2col_grad_bwd(strides, res, dy):
  x, kernel = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides), x)
  with jax.named_scope('im2col'):
    patches = _im2col_t(x, kernel.shape[0], strides)
    dk = patches @ dy.reshape(-1, dy.shape[-1])
  return input_vjp(dy)[0], dk.reshape(kernel.shape)


conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)


def _conv_im2col_fwd(x, kernel, strides):
  patches = _im2col(x, kernel.shape[0], strides)
  return patches @ kernel.reshape(-1, kernel.shape[-1]), (x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_im2col(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """The convolution as one matmul of the im2col patches and the kernel.
  Its gradients are matmuls too: the input's through the patches' adjoint
  (pads and adds), the kernel's of channel-major patches rebuilt from x
  (`_im2col_t`), so that neither the patches nor a transposed copy of
  them is kept from the forward pass."""
  return _conv_im2col_fwd(x, kernel, strides)[0]


def _conv_im2col_bwd(strides, res, dy):
  x, kernel = res
  k, d = kernel.shape[0], kernel.shape[-1]
  with jax.named_scope('im2col'):
    _, patches_vjp = jax.vjp(lambda x: _im2col(x, k, strides), x)
    dx = patches_vjp(jnp.einsum('bhwd,cd->bhwc', dy,
                                kernel.reshape(-1, d)))[0]
    dk = _im2col_t(x, k, strides) @ dy.reshape(-1, d)
  return dx, dk.reshape(kernel.shape)


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1,
         impl: str = 'auto') -> jax.Array:
  """'SAME' convolution of NHWC `x` with an HWIO `kernel` [k, k, C, D]."""
  impl = resolve(impl, x.shape, kernel.shape[0], strides)
  if impl == 'xla':
    return _xla_conv(x, kernel, strides)
  if impl == 'winograd':
    return winograd.conv(x, kernel)
  if impl == 'im2col_grad':
    return conv_im2col_grad(x, kernel, strides)
  with jax.named_scope('im2col'):
    return conv_im2col(x, kernel, strides)
