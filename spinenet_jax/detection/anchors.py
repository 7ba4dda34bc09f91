"""Multilevel RetinaNet anchors (Model Garden `Anchor` semantics).

Order of the flattened anchors: level (min..max), then feature row y, then
column x, then anchor index `a = scale * len(aspect_ratios) + ratio`. This is
the order of the head's `[B, H_l, W_l, A * K]` outputs reshaped to
`[B, H_l * W_l * A, K]` and concatenated over levels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ImageSize = int | Sequence[int]


def image_hw(image_size: ImageSize) -> tuple[int, int]:
  """Returns `(height, width)` from an int or a `(height, width)` pair."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  hw = tuple(int(s) for s in image_size)
  if len(hw) != 2:
    raise ValueError(f'image_size must be an int or (height, width), got '
                     f'{image_size!r}')
  return hw


def feature_sizes(image_size: ImageSize, min_level: int = 3,
                  max_level: int = 7) -> dict[int, tuple[int, int]]:
  """`{level: (H_l, W_l)}` of the feature maps for an input size."""
  h, w = image_hw(image_size)
  if min_level < 1 or max_level < min_level:
    raise ValueError(f'need 1 <= min_level <= max_level, got min_level='
                     f'{min_level}, max_level={max_level}')
  stride = 2**max_level
  if h <= 0 or w <= 0 or h % stride or w % stride:
    raise ValueError(
        f'image size {(h, w)} must be positive and divisible by '
        f'2**max_level = {stride}; pad the images to a multiple of {stride}')
  return {l: (h // 2**l, w // 2**l) for l in range(min_level, max_level + 1)}


def level_anchors(level: int, image_size: ImageSize, num_scales: int = 3,
                  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                  anchor_size: float = 3.0) -> np.ndarray:
  """Anchors of one level, `[H_l, W_l, A, 4]` yxyx in pixels (float32)."""
  h, w = image_hw(image_size)
  stride = 2**level
  scales = 2.0**(np.arange(num_scales) / float(num_scales))
  ratios = np.asarray(aspect_ratios, np.float64)
  if num_scales < 1 or ratios.size == 0 or np.any(ratios <= 0):
    raise ValueError(f'need num_scales >= 1 and positive aspect ratios, got '
                     f'num_scales={num_scales}, aspect_ratios={aspect_ratios}')
  base = anchor_size * stride * scales[:, None]  # [S, 1]
  half_w = (base * np.sqrt(ratios)[None, :] / 2.0).reshape(-1)  # [A]
  half_h = (base / np.sqrt(ratios)[None, :] / 2.0).reshape(-1)
  ys = np.arange(stride / 2, h, stride)
  xs = np.arange(stride / 2, w, stride)
  yc = ys[:, None, None]
  xc = xs[None, :, None]
  boxes = np.stack(np.broadcast_arrays(yc - half_h, xc - half_w, yc + half_h,
                                       xc + half_w), axis=-1)
  return boxes.astype(np.float32)


def multilevel_anchors(image_size: ImageSize, min_level: int = 3,
                       max_level: int = 7, num_scales: int = 3,
                       aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                       anchor_size: float = 3.0) -> np.ndarray:
  """All anchors, `[N, 4]` yxyx pixels, in the head's flattened order.

  Level `l` has stride `2**l`, centres at `stride / 2 + k * stride` and, for
  scale `s` and aspect ratio `r = w / h`, size
  `base = anchor_size * 2**l * 2**(s / num_scales)`, `w = base * sqrt(r)`,
  `h = base / sqrt(r)`. 640x640 with the defaults gives 76,725 anchors.

  Returns a NumPy array (a compile-time constant inside `jax.jit`).
  """
  sizes = feature_sizes(image_size, min_level, max_level)
  return np.concatenate([
      level_anchors(l, image_size, num_scales, aspect_ratios,
                    anchor_size).reshape(-1, 4) for l in sizes
  ], axis=0)
