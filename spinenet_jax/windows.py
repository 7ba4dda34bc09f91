"""The shifted, strided views of a padded feature map that im2col
(`conv_impl.py`) and Winograd (`winograd.py`) convolutions gather."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def strided(x: jax.Array, k: int, s: int, pads: Sequence[tuple[int, int]],
            axes: str = 'NHWC') -> list[jax.Array]:
  """The k*k views of x padded by `pads` ((top, bottom), (left, right)) that
  start at (i, j), i, j < k, and step by s: as many per axis as whole k-wide
  windows fit. x's dimensions are in the order `axes` ('NHWC' or 'CNHW');
  the views keep that order."""
  hi, wi = axes.index('H'), axes.index('W')
  full = [(0, 0)] * x.ndim
  full[hi], full[wi] = pads
  xp = jnp.pad(x, full)
  ho, wo = (xp.shape[hi] - k) // s + 1, (xp.shape[wi] - k) // s + 1
  views = []
  for i in range(k):
    for j in range(k):
      index = [slice(None)] * x.ndim
      index[hi] = slice(i, i + (ho - 1) * s + 1, s)
      index[wi] = slice(j, j + (wo - 1) * s + 1, s)
      views.append(xp[tuple(index)])
  return views
