"""The head's per-level outputs in anchor order.

RetinaNet predicts `{level: [B, H_l, W_l, A * K]}` (channel `a * K + k`).
Reshaped to `[B, H_l * W_l * A, K]` and taken in increasing level order, the
rows follow `anchors.multilevel_anchors`: level, row, column, anchor.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp

from spinenet_jax import sharding_utils

Array = jnp.ndarray


def flatten_levels(cls_outputs: Mapping[Any, Array],
                   box_outputs: Mapping[Any, Array],
                   num_classes: int | None = None
                   ) -> tuple[list[Array], list[Array]]:
  """Per-level `[B, N_l, num_classes]` logits and `[B, N_l, 4]` deltas.

  Args:
    cls_outputs: `{level: [B, H, W, A * num_classes]}`, int levels.
    box_outputs: `{level: [B, H, W, A * 4]}`, the same levels.
    num_classes: classes per anchor; inferred from the channels if None.

  Returns:
    Lists over increasing levels; `N_l = H * W * A`. The batch axis keeps its
    sharding.
  """
  levels = sorted(cls_outputs, key=int)
  if sorted(box_outputs, key=int) != levels:
    raise ValueError(f'cls_outputs levels {levels} differ from box_outputs '
                     f'levels {sorted(box_outputs, key=int)}')
  num_anchors = box_outputs[levels[0]].shape[-1] // 4
  if num_classes is None:
    num_classes = cls_outputs[levels[0]].shape[-1] // max(num_anchors, 1)
  cls, box = [], []
  for level in levels:
    c, b = cls_outputs[level], box_outputs[level]
    if (c.shape[-1] != num_anchors * num_classes or
        b.shape[-1] != num_anchors * 4 or c.shape[:-1] != b.shape[:-1]):
      raise ValueError(f'level {level}: cls {c.shape} and box {b.shape} do not '
                       f'fit {num_anchors} anchors x {num_classes} classes')
    n = math.prod(b.shape[1:-1]) * num_anchors
    cls.append(sharding_utils.reshape_keep_batch(
        c, (c.shape[0], n, num_classes)))
    box.append(sharding_utils.reshape_keep_batch(b, (b.shape[0], n, 4)))
  return cls, box
