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
[k*k*C_in, C_out]; its gradients are matmuls too. Everything else, and
every convolution on GPU/TPU, keeps XLA's convolution: for narrow or large
maps im2col is slower and compiles more slowly.

Every matmul of a convolution, 1x1 ones included, has its gradients written
out (`matmul`): JAX derives the same two matmuls, but the order of its
kernel-gradient contraction makes XLA:CPU first copy the output gradient of
every 1x1 convolution to channel-major, a strided transpose that cost more
than the matmuls themselves (the demo's training step: 315 -> 253 ms, A/B in
one process). On CPU 'auto' therefore runs 1x1 convolutions as `matmul`;
elsewhere they stay the einsum JAX differentiates.

The choice is made here and nowhere else: `resolve('auto', ...)` picks by
backend, kernel size, map size and width; `config.model.conv_impl` ('auto',
'xla', 'im2col') forces one for every convolution ('im2col' of a 1x1 kernel
is `matmul`, 'xla' the einsum JAX differentiates). Both give the same results
up to float rounding (tests/test_conv_impl.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IMPLS = ('xla', 'im2col')
CHOICES = ('auto',) + IMPLS
# 'auto' on CPU runs im2col for maps smaller than the kernel, and for maps of
# at most IM2COL_MAX_PIXELS pixels with at least IM2COL_MIN_CHANNELS input
# channels (measured crossovers: 16x16 is 1.2x faster as im2col at 256
# channels, 32x32 1.3-1.6x slower; 128 channels is a wash).
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 256


def check(impl: str) -> str:
  """`impl` if it is a known choice, else a ValueError that lists them."""
  if impl not in CHOICES:
    raise ValueError(f'conv_impl={impl!r} is not one of {CHOICES}; use '
                     "'auto' unless you are comparing lowerings.")
  return impl


def resolve(impl: str, shape: Sequence[int], kernel_size: int) -> str:
  """The lowering `impl` stands for on an NHWC input of `shape`."""
  if check(impl) != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  if kernel_size == 1:
    return 'im2col'
  h, w, c = shape[1:]
  tiny = h < kernel_size or w < kernel_size
  wide = h * w <= IM2COL_MAX_PIXELS and c >= IM2COL_MIN_CHANNELS
  return 'im2col' if tiny or wide else 'xla'


def _views(x: jax.Array, k: int, s: int) -> list[jax.Array]:
  """The k*k shifted, strided views of x padded as TF 'SAME' pads it."""
  h, w = x.shape[1:3]
  (pt, pb), (pl, pr) = jax.lax.padtype_to_pads((h, w), (k, k), (s, s), 'SAME')
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = -(-h // s), -(-w // s)
  return [xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :]
          for i in range(k) for j in range(k)]


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


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1,
         impl: str = 'auto') -> jax.Array:
  """'SAME' convolution of NHWC `x` with an HWIO `kernel` [k, k, C, D]."""
  if resolve(impl, x.shape, kernel.shape[0]) == 'xla':
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  with jax.named_scope('im2col'):
    patches = jnp.concatenate(_views(x, kernel.shape[0], strides), axis=-1)
    return matmul(patches, kernel.reshape(-1, kernel.shape[-1]))
