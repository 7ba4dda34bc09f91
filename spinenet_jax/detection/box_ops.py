"""Box utilities for boxes stored as (ymin, xmin, ymax, xmax) in pixels.

Box coding follows Model Garden's `FasterRcnnBoxCoder` with no scale factors:
`dy = (yc - yc_a) / h_a`, `dx = (xc - xc_a) / w_a`, `dh = log(h / h_a)`,
`dw = log(w / w_a)`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# Model Garden `box_ops.BBOX_XFORM_CLIP`: largest dh, dw accepted when decoding.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)

Array = jnp.ndarray


def area(boxes: Array) -> Array:
  """Area of `[..., 4]` yxyx boxes (negative extents count as zero)."""
  h = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  w = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return h * w


def iou(boxes1: Array, boxes2: Array) -> Array:
  """Pairwise IoU of `[..., N, 4]` and `[..., M, 4]` boxes -> `[..., N, M]`.

  Pairs whose union is empty (two degenerate boxes) get IoU 0.
  """
  b1 = boxes1[..., :, None, :]
  b2 = boxes2[..., None, :, :]
  ymin = jnp.maximum(b1[..., 0], b2[..., 0])
  xmin = jnp.maximum(b1[..., 1], b2[..., 1])
  ymax = jnp.minimum(b1[..., 2], b2[..., 2])
  xmax = jnp.minimum(b1[..., 3], b2[..., 3])
  inter = jnp.maximum(ymax - ymin, 0.0) * jnp.maximum(xmax - xmin, 0.0)
  union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
  return jnp.where(union > 0.0, inter / jnp.where(union > 0.0, union, 1.0),
                   0.0)


def _centers_sizes(boxes: Array) -> tuple[Array, Array, Array, Array]:
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode(boxes: Array, anchors: Array) -> Array:
  """Encodes yxyx `boxes` against `anchors` (broadcastable) -> (dy, dx, dh, dw).

  Boxes must have positive height and width (the log is not guarded).
  """
  yc, xc, h, w = _centers_sizes(boxes)
  yc_a, xc_a, h_a, w_a = _centers_sizes(anchors)
  return jnp.stack([(yc - yc_a) / h_a, (xc - xc_a) / w_a,
                    jnp.log(h / h_a), jnp.log(w / w_a)], axis=-1)


def decode(deltas: Array, anchors: Array) -> Array:
  """Decodes (dy, dx, dh, dw) `deltas` against `anchors` -> yxyx boxes.

  `dh` and `dw` are clipped at `log(1000 / 16)` first, as in Model Garden.
  """
  yc_a, xc_a, h_a, w_a = _centers_sizes(anchors)
  dy, dx = deltas[..., 0], deltas[..., 1]
  dh = jnp.minimum(deltas[..., 2], BBOX_XFORM_CLIP)
  dw = jnp.minimum(deltas[..., 3], BBOX_XFORM_CLIP)
  yc, xc = dy * h_a + yc_a, dx * w_a + xc_a
  h, w = jnp.exp(dh) * h_a, jnp.exp(dw) * w_a
  ymin, xmin = yc - 0.5 * h, xc - 0.5 * w
  return jnp.stack([ymin, xmin, ymin + h, xmin + w], axis=-1)


def clip(boxes: Array, image_size: int | Sequence[int] | Array) -> Array:
  """Clips yxyx boxes to `[0, height] x [0, width]`.

  `image_size` is an int, `(height, width)`, or an array broadcastable to
  `boxes.shape[:-1] + (2,)` (e.g. `[B, 1, 2]` for per-image sizes).
  """
  size = jnp.asarray(image_size, jnp.float32)
  if size.ndim == 0:
    size = jnp.stack([size, size])
  hw = jnp.concatenate([size, size], axis=-1)
  return jnp.clip(boxes, 0.0, hw.astype(boxes.dtype))
