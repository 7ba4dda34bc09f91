"""3x3 stride-1 'SAME' convolutions as Winograd F(4x4, 3x3) matmuls.

Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016) computes each 4x4 output tile of
a 3x3 convolution from the 6x6 input tile around it with 36 multiplications
per input-output channel pair instead of 144: the input tiles and the kernel
are taken to a 6x6 transform domain by fixed linear maps, multiplied there
as 36 independent [tiles, C] @ [C, D] matmuls, and the products taken back.
On CPU that is 4x fewer multiply-adds than the convolution for the
transforms' cost, which only pays on large maps of wide convolutions (the
RetinaNet head at 640 px; benchmarks/README.md, "Winograd convolutions").

The transforms are those of the Toom-Cook construction on the points
0, 1, -1, 1/2, -2 and infinity. The usual 0, +-1, +-2 give 3-4x larger
float rounding (1.5-2e-5 of the output's range at 256 channels, against
5-6e-6 here and 6e-7 for XLA's convolution).

Every transform is a matmul with a constant matrix (`kron` of the 1-D
transform with itself), so that XLA:CPU runs it in YNNPACK on every thread:
the tiles are gathered as 36 strided views of the padded input (stacked,
never transposed elementwise), multiplied by the [36, 36] input transform,
and the [16, 36] output transform gives the 16 output pixels of every tile.

Gradients are written out (`conv`): the input gradient is the same Winograd
convolution of the output gradient with the kernel turned 180 degrees and its
channels swapped; the kernel gradient is 36 [C, tiles] @ [tiles, D] matmuls
in the transform domain, the input tiles built channel-major from x
transposed once (the matmul's left operand must be contiguous over tiles),
taken back by the kernel transform's adjoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spinenet_jax import windows

M, R = 4, 3          # output tile, kernel size
N = M + R - 1        # input tile
# The 1-D transforms: y = AT [(G g) * (BT d)] for a 6-sample input d and a
# 3-tap kernel g (tests/test_conv_impl.py checks the identity in float64).
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 1 / 2, -2, 0],
               [0, 1, 1, 1 / 4, 4, 0],
               [0, 1, -1, 1 / 8, -8, 1]])
G = np.array([[1, 0, 0],
              [1 / 3, 1 / 3, 1 / 3],
              [-1 / 3, 1 / 3, -1 / 3],
              [-16 / 15, -8 / 15, -4 / 15],
              [1 / 15, -2 / 15, 4 / 15],
              [0, 0, 1]])
BT = np.array([[1, -3 / 2, -2, 3 / 2, 1, 0],
               [0, -1, 1 / 2, 5 / 2, 1, 0],
               [0, 1, -5 / 2, 1 / 2, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 1 / 2, -1, -1 / 2, 1, 0],
               [0, 1, -3 / 2, -2, 3 / 2, 1]])
# The 2-D transforms as matrices over flattened (row, column) tiles.
_KB = np.kron(BT, BT).astype(np.float32)    # [36, 36] input
_KA = np.kron(AT, AT).astype(np.float32)    # [16, 36] output
_KG = np.kron(G, G).astype(np.float32)      # [36, 9] kernel


def _tiles(x: jax.Array, axes: str) -> tuple[jax.Array, tuple[int, int]]:
  """The 6x6 input tiles of x (dimensions in the order `axes`, 'NHWC' or
  'CNHW') at stride 4, as the 36 strided views stacked first:
  [36, *x's other dims with H, W replaced by the tile grid]; and the grid."""
  h, w = x.shape[axes.index('H')], x.shape[axes.index('W')]
  th, tw = -(-h // M), -(-w // M)
  pads = ((1, th * M + 1 - h), (1, tw * M + 1 - w))
  views = windows.strided(x, N, M, pads, axes)
  return jnp.stack(views), (th, tw)


def _forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  d = kernel.shape[-1]
  tiles, (th, tw) = _tiles(x, 'NHWC')                        # [36,B,th,tw,C]
  v = (_KB @ tiles.reshape(N * N, -1)).reshape(N * N, -1, c)  # [36, T, C]
  u = (_KG @ kernel.reshape(R * R, -1)).reshape(N * N, c, d)  # [36, C, D]
  m = jnp.einsum('xtc,xcd->xtd', v, u)                       # [36, T, D]
  y = (_KA @ m.reshape(N * N, -1)).reshape(M, M, b, th, tw, d)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, th * M, tw * M, d)
  return y[:, :h, :w]


def _kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """d(loss)/d(kernel) of `conv(x, kernel)` for the output gradient dy."""
  b, h, w, c = x.shape
  d = dy.shape[-1]
  tiles, (th, tw) = _tiles(jnp.transpose(x, (3, 0, 1, 2)), 'CNHW')
  vt = (_KB @ tiles.reshape(N * N, -1)).reshape(N * N, c, -1)  # [36, C, T]
  dy = jnp.pad(dy, ((0, 0), (0, th * M - h), (0, tw * M - w), (0, 0)))
  dy = dy.reshape(b, th, M, tw, M, d).transpose(2, 4, 0, 1, 3, 5)
  dm = (_KA.T @ dy.reshape(M * M, -1)).reshape(N * N, -1, d)  # [36, T, D]
  du = jnp.einsum('xct,xtd->xcd', vt, dm)                    # [36, C, D]
  return (_KG.T @ du.reshape(N * N, -1)).reshape(R, R, c, d)


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3, stride-1 'SAME' convolution of NHWC `x` with an HWIO `kernel`,
  as Winograd F(4x4, 3x3), its gradients written out (see the module
  docstring). Equal to XLA's up to float rounding (6e-6 of the output's
  range at 256 channels). Computed in float32 whatever the inputs' dtype
  (the transforms would amplify bfloat16's rounding), returned in x's."""
  if kernel.shape[:2] != (R, R):
    raise ValueError(f'winograd.conv takes 3x3 kernels, got {kernel.shape}')
  f32 = jnp.float32
  return _conv(x.astype(f32), kernel.astype(f32)).astype(x.dtype)


@jax.custom_vjp
def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _forward(x, kernel)


def _conv_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(res, dy):
  x, kernel = res
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  return _forward(dy, flipped), _kernel_grad(x, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)
