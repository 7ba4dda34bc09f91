"""On-device anchor labelling (Model Garden `AnchorLabeler` semantics).

Conventions (identical to Model Garden's RetinaNet labeler and loss):

- `cls_targets` int32 `[N]`: the matched ground-truth class id (>= 1) for
  positive anchors and -1 for negative and ignored anchors. The loss uses
  `one_hot(cls_targets, num_classes)`, so non-positives give an all-zero row
  and column 0 (background) is never positive.
- `box_targets` float32 `[N, 4]`: encoded (dy, dx, dh, dw) of the matched box
  for positives, 0 elsewhere.
- `cls_weights` float32 `[N]`: 1 for positives and negatives, 0 for ignored
  anchors (IoU in `[unmatched_threshold, match_threshold)`; none with the
  default thresholds of 0.5 / 0.5).
- `box_weights` float32 `[N]`: 1 for positives, 0 elsewhere.

Matching: an anchor's best IoU over the valid ground truth decides positive
(`>= match_threshold`) or negative (`< unmatched_threshold`); then every valid
ground-truth box is force-matched to its best anchor (first anchor on ties;
where several boxes pick the same anchor, the lowest box index wins).

Ground-truth rows are valid when `gt_classes > 0`, `is_crowd` is False and
the box has positive height and width. Everything else (padding with class -1,
crowd boxes, degenerate boxes) is ignored, as if absent: Model Garden drops
crowd boxes from training data, so anchors on a crowd region are negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spinenet_jax import sharding_utils
from spinenet_jax.detection import box_ops

Array = jnp.ndarray


def assign(anchors: Array, gt_boxes: Array, gt_classes: Array,
           is_crowd: Array | None = None, match_threshold: float = 0.5,
           unmatched_threshold: float = 0.5) -> dict[str, Array]:
  """Labels `[N, 4]` anchors with one image's padded ground truth.

  Args:
    anchors: `[N, 4]` yxyx anchors in pixels.
    gt_boxes: `[M, 4]` yxyx ground-truth boxes in pixels (padded).
    gt_classes: `[M]` integer class ids; values <= 0 mark padding.
    is_crowd: optional `[M]` bool; crowd boxes are ignored.
    match_threshold: IoU at or above which an anchor is positive.
    unmatched_threshold: IoU below which an anchor is negative.

  Returns:
    dict with `cls_targets [N]`, `box_targets [N, 4]`, `cls_weights [N]`,
    `box_weights [N]` (see the module docstring).
  """
  if unmatched_threshold > match_threshold:
    raise ValueError(f'unmatched_threshold={unmatched_threshold} must be <= '
                     f'match_threshold={match_threshold}')
  if anchors.ndim != 2 or gt_boxes.ndim != 2 or gt_classes.ndim != 1:
    raise ValueError(
        f'assign works on one image: anchors [N, 4], gt_boxes [M, 4], '
        f'gt_classes [M]; got shapes {anchors.shape}, {gt_boxes.shape}, '
        f'{gt_classes.shape} (use assign_batch for a batch)')
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]

  valid = ((gt_classes > 0) & (gt_boxes[:, 2] > gt_boxes[:, 0]) &
           (gt_boxes[:, 3] > gt_boxes[:, 1]))
  if is_crowd is not None:
    valid &= ~jnp.asarray(is_crowd, bool)
  sim = jnp.where(valid[None, :], box_ops.iou(anchors, gt_boxes), -1.0)

  matched = jnp.argmax(sim, axis=1)  # [N]
  best = jnp.max(sim, axis=1)
  positive = best >= match_threshold
  ignored = (best >= unmatched_threshold) & ~positive

  # Force-match every valid box to its best anchor (lowest box index wins).
  best_anchor = jnp.argmax(sim, axis=0)  # [M]
  forced_gt = jnp.full((num_anchors,), num_gt, jnp.int32).at[best_anchor].min(
      jnp.where(valid, jnp.arange(num_gt, dtype=jnp.int32), num_gt))
  forced = forced_gt < num_gt
  matched = jnp.where(forced, forced_gt, matched)
  positive |= forced
  ignored &= ~forced

  cls_targets = jnp.where(positive, gt_classes[matched], -1)
  # Non-positives are encoded against their own anchor so the log stays finite.
  target_boxes = jnp.where(positive[:, None], gt_boxes[matched], anchors)
  box_targets = jnp.where(positive[:, None],
                          box_ops.encode(target_boxes, anchors), 0.0)
  return {
      'cls_targets': cls_targets.astype(jnp.int32),
      'box_targets': box_targets,
      'cls_weights': (~ignored).astype(jnp.float32),
      'box_weights': positive.astype(jnp.float32),
  }


def assign_batch(anchors: Array, gt_boxes: Array, gt_classes: Array,
                 is_crowd: Array | None = None,
                 match_threshold: float = 0.5,
                 unmatched_threshold: float = 0.5) -> dict[str, Array]:
  """`assign` vectorised over a batch: `gt_boxes [B, M, 4]`, `gt_classes [B, M]`.

  The anchors are shared; outputs get a leading batch axis. Sharding of the
  batch axis is preserved when called inside `jax.jit`.
  """
  if gt_boxes.ndim != 3 or gt_classes.ndim != 2:
    raise ValueError(f'assign_batch needs gt_boxes [B, M, 4] and gt_classes '
                     f'[B, M]; got shapes {gt_boxes.shape}, '
                     f'{gt_classes.shape}')
  if is_crowd is None:
    is_crowd = jnp.zeros(gt_classes.shape, bool)
  gt_classes = sharding_utils.batch_like(jnp.asarray(gt_classes), gt_boxes)
  is_crowd = sharding_utils.batch_like(jnp.asarray(is_crowd), gt_boxes)
  fn = lambda b, c, k: assign(anchors, b, c, k, match_threshold,
                              unmatched_threshold)
  return jax.vmap(fn)(gt_boxes, gt_classes, is_crowd)
