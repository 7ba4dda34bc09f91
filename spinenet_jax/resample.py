"""Cross-scale resampling between SpineNet blocks.

Du et al., CVPR 2020 (arXiv:1912.05027), section 3.2, as Model Garden builds
it: `official/vision/modeling/backbones/spinenet.py`
`SpineNet._resample_with_alpha` and, for SpineNet-Mobile,
`spinenet_mobile.py` `SpineNetMobile._resample_with_sepconv`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from spinenet_jax import layers


def _same_padding(n: int) -> tuple[int, tuple[int, int]]:
  """Output size and (before, after) padding of TF 'SAME' 3x3 stride 2."""
  out = -(-n // 2)
  total = max((out - 1) * 2 + 3 - n, 0)
  return out, (total // 2, total - total // 2)


@jax.custom_vjp
def max_pool(x: jax.Array) -> jax.Array:
  """3x3 stride-2 'SAME' max pool (padding never wins the max).

  The gradient is written out instead of XLA's `select_and_scatter`, which
  is 3-4x slower on CPU (benchmarks/README.md). It is bitwise the same:
  each output's gradient goes to the first maximum of its window in
  row-major order, ties included.
  """
  return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2),
                     padding='SAME')


def _max_pool_fwd(x):
  y = max_pool(x)
  return y, (x, y)


# Per axis, the window offsets that reach a padded input at 2a + p, for each
# parity p, as (offset, d): the window of output a - d. Even positions are
# shared by two windows per axis (offsets 0 and 2), odd ones by one.
_TAPS = {p: tuple((i, di) for i, di in ((p, 0), (p + 2, 1)) if i < 3)
         for p in (0, 1)}


def _max_pool_bwd(res, g):
  """Each window's first maximum gets its output's gradient. Computed per
  output (nine strided compares) and gathered per input parity class, so
  every sum has at most four terms at a quarter of the input's size; then
  the four classes are interleaved (3x faster than scattering each
  window offset onto the full padded input)."""
  x, y = res
  oh, (ph0, ph1) = _same_padding(x.shape[1])
  ow, (pw0, pw1) = _same_padding(x.shape[2])
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)),
               constant_values=jnp.array(-jnp.inf, x.dtype))
  zero = jnp.array(0, g.dtype)
  taken = jnp.zeros(y.shape, bool)
  hits = {}
  for i in range(3):
    for j in range(3):
      window = xp[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2, :]
      hits[i, j] = (window == y) & ~taken
      taken = taken | hits[i, j]

  def parity_class(p, q):
    """The gradient at padded inputs (2a + p, 2b + q), [B, oh+1, ow+1, C]."""
    total = None
    for i, di in _TAPS[p]:
      for j, dj in _TAPS[q]:
        term = jnp.pad(jnp.where(hits[i, j], g, zero),
                       ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))
        total = term if total is None else total + term
    return total

  rows = [jnp.stack([parity_class(p, 0), parity_class(p, 1)], axis=3)
          for p in (0, 1)]
  grid = jnp.stack(rows, axis=2).reshape(
      g.shape[0], 2 * oh + 2, 2 * ow + 2, g.shape[-1])
  return (grid[:, ph0:ph0 + x.shape[1], pw0:pw0 + x.shape[2], :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def resize_nearest(x: jax.Array, size: tuple[int, int],
                   resize_fallback: bool = False) -> jax.Array:
  """Nearest upsampling by an integer factor, as Model Garden does.

  When `size` is not an integer multiple of the input, uses a nearest resize
  if `resize_fallback` (the original TPU code's behaviour, needed for
  classification at 224), and otherwise raises a ValueError.
  """
  h, w = x.shape[1:3]
  if size[0] % h == 0 and size[1] % w == 0:
    return jnp.repeat(jnp.repeat(x, size[0] // h, axis=1), size[1] // w, axis=2)
  if not resize_fallback:
    raise ValueError(f'Cannot upsample a {h}x{w} feature map to {size[0]}x'
                     f'{size[1]} by an integer factor; use an input size '
                     'divisible by 2^max_level.')
  # tf.compat.v1.image.resize_nearest_neighbor: source index floor(i * in/out).
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class Resample(nn.Module):
  """Resamples a parent feature to a target block's level and width.

  1x1 conv to `alpha` of the parent's block filters, then a stride-2 3x3 conv
  and repeated 3x3/2 max-pools (down) or nearest upsampling (up), then a 1x1
  conv with batch norm and no activation to the target's channels.
  """
  parent_block_fn: str
  target_channels: int
  alpha: float = 0.5
  activation: str = 'relu'
  resize_fallback: bool = False
  conv: layers.ModuleDef = layers.Conv
  norm: layers.ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int],
               train: bool) -> jax.Array:
    conv_bn = functools.partial(layers.ConvBN, conv=self.conv, norm=self.norm)
    c = x.shape[-1]
    if self.parent_block_fn == 'bottleneck':
      c /= 4
    c = int(c * self.alpha)
    x = conv_bn(c, 1, 1, self.activation, name='reduce')(x, train)
    if x.shape[1] > size[0]:
      x = conv_bn(c, 3, 2, self.activation, name='down')(x, train)
      while x.shape[1] > size[0]:
        x = max_pool(x)
    elif x.shape[1] < size[0]:
      x = resize_nearest(x, size, self.resize_fallback)
    return conv_bn(self.target_channels, 1, 1, None, name='project')(x, train)


class SeparableResample(nn.Module):
  """SpineNet-Mobile's `resample_with_sepconv`.

  No 1x1 reduction first. Down: repeated depthwise 3x3 stride-2 conv -> BN ->
  act (one per factor of 2, named `down0`, `down1`, ...); up: nearest
  upsampling by an integer factor. Then a 1x1 conv with batch norm and no
  activation to the target's channels.
  """
  target_channels: int
  activation: str = 'relu'
  resize_fallback: bool = False
  conv: layers.ModuleDef = layers.Conv
  depthwise_conv: layers.ModuleDef = layers.DepthwiseConv
  norm: layers.ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int],
               train: bool) -> jax.Array:
    k = 0
    while x.shape[1] > size[0]:
      x = layers.DepthwiseConvBN(3, 2, self.activation,
                                 conv=self.depthwise_conv, norm=self.norm,
                                 name=f'down{k}')(x, train)
      k += 1
    if x.shape[1] < size[0]:
      x = resize_nearest(x, size, self.resize_fallback)
    return layers.ConvBN(self.target_channels, 1, 1, None, conv=self.conv,
                         norm=self.norm, name='project')(x, train)
