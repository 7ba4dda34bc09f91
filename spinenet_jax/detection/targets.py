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

On CPU the matching walks the ground-truth rows one at a time (a `scan`
carrying each anchor's best IoU so far), never materialising the [N, M] IoU
matrix: XLA:CPU reduces that matrix over its short axis with scalar loops
(86-100 ms for 76,725 anchors x 100 rows x 2 images at 640 px, against
13-22 ms for the scan; benchmarks/README.md). Accelerators keep the dense
matrix. Both give the same labels exactly (tests/test_detection.py).

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


def _match_dense(anchors: Array, gt_boxes: Array,
                 valid: Array) -> tuple[Array, Array, Array]:
  """For `[B, M, 4]` ground truth (rows `valid` [B, M]): each anchor's best
  IoU [B, N], its first ground-truth row [B, N], and each row's first best
  anchor [B, M], from the whole [N, M] IoU matrix of each image; invalid
  rows score -1."""
  def one(boxes, ok):
    sim = jnp.where(ok[None, :], box_ops.iou(anchors, boxes), -1.0)
    return (jnp.max(sim, axis=1), jnp.argmax(sim, axis=1).astype(jnp.int32),
            jnp.argmax(sim, axis=0).astype(jnp.int32))
  return jax.vmap(one)(gt_boxes, valid)


def _match_scan(anchors: Array, gt_boxes: Array,
                valid: Array) -> tuple[Array, Array, Array]:
  """`_match_dense`'s result, one ground-truth row (of every image) per
  step: a strictly greater IoU replaces the carried best, so the first row
  wins ties."""
  def scores(box, ok):  # [B, 4], [B] -> [B, N]
    return jnp.where(ok[:, None],
                     box_ops.iou(anchors, box[:, None, :])[..., 0], -1.0)

  def step(carry, row):
    best, matched = carry
    box, ok, index = row
    sim = scores(box, ok)
    better = sim > best
    return ((jnp.where(better, sim, best), jnp.where(better, index, matched)),
            jnp.argmax(sim, axis=1).astype(jnp.int32))

  # Row 0 starts the carry, so that it is sharded as the batch is.
  first = scores(gt_boxes[:, 0], valid[:, 0])
  rows = (jnp.moveaxis(gt_boxes[:, 1:], 1, 0), valid[:, 1:].T,
          jnp.arange(1, gt_boxes.shape[1], dtype=jnp.int32))
  init = (first, jnp.zeros_like(first, jnp.int32))
  (best, matched), best_anchor = jax.lax.scan(step, init, rows)
  best_anchor = jnp.concatenate(
      [jnp.argmax(first, axis=1).astype(jnp.int32)[:, None], best_anchor.T],
      axis=1)
  return best, matched, best_anchor


_MATCHERS = {'dense': _match_dense, 'scan': _match_scan}
MATCHERS = ('auto',) + tuple(_MATCHERS)


def _matcher(matcher: str) -> str:
  """The matcher `matcher` stands for: 'auto' is 'scan' on CPU, else
  'dense'."""
  if matcher not in MATCHERS:
    raise ValueError(f'matcher={matcher!r} is not one of {MATCHERS}; use '
                     "'auto' unless you are comparing the two.")
  if matcher != 'auto':
    return matcher
  return 'scan' if jax.default_backend() == 'cpu' else 'dense'


def _labels(anchors: Array, gt_boxes: Array, gt_classes: Array, valid: Array,
            best: Array, matched: Array, best_anchor: Array,
            match_threshold: float,
            unmatched_threshold: float) -> dict[str, Array]:
  """One image's targets from its matching (see `assign`)."""
  num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
  positive = best >= match_threshold
  ignored = (best >= unmatched_threshold) & ~positive

  # Force-match every valid box to its best anchor (lowest box index wins).
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


def _assign(anchors: Array, gt_boxes: Array, gt_classes: Array,
            is_crowd: Array, match_threshold: float,
            unmatched_threshold: float, matcher: str) -> dict[str, Array]:
  """`assign_batch` on checked `[B, M, ...]` ground truth."""
  if unmatched_threshold > match_threshold:
    raise ValueError(f'unmatched_threshold={unmatched_threshold} must be <= '
                     f'match_threshold={match_threshold}')
  match = _MATCHERS[_matcher(matcher)]
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = sharding_utils.batch_like(
      jnp.asarray(gt_classes, jnp.int32), gt_boxes)
  is_crowd = sharding_utils.batch_like(jnp.asarray(is_crowd, bool), gt_boxes)
  valid = ((gt_classes > 0) & (gt_boxes[..., 2] > gt_boxes[..., 0]) &
           (gt_boxes[..., 3] > gt_boxes[..., 1]) & ~is_crowd)
  best, matched, best_anchor = match(anchors, gt_boxes, valid)
  labels = lambda *xs: _labels(anchors, *xs, match_threshold,
                               unmatched_threshold)
  return jax.vmap(labels)(gt_boxes, gt_classes, valid, best, matched,
                          best_anchor)


def assign(anchors: Array, gt_boxes: Array, gt_classes: Array,
           is_crowd: Array | None = None, match_threshold: float = 0.5,
           unmatched_threshold: float = 0.5,
           matcher: str = 'auto') -> dict[str, Array]:
  """Labels `[N, 4]` anchors with one image's padded ground truth.

  Args:
    anchors: `[N, 4]` yxyx anchors in pixels.
    gt_boxes: `[M, 4]` yxyx ground-truth boxes in pixels (padded).
    gt_classes: `[M]` integer class ids; values <= 0 mark padding.
    is_crowd: optional `[M]` bool; crowd boxes are ignored.
    match_threshold: IoU at or above which an anchor is positive.
    unmatched_threshold: IoU below which an anchor is negative.
    matcher: how IoUs are reduced: 'dense' (the [N, M] matrix), 'scan' (one
      ground-truth row at a time) or 'auto' ('scan' on CPU); the labels are
      the same.

  Returns:
    dict with `cls_targets [N]`, `box_targets [N, 4]`, `cls_weights [N]`,
    `box_weights [N]` (see the module docstring).
  """
  if anchors.ndim != 2 or gt_boxes.ndim != 2 or gt_classes.ndim != 1:
    raise ValueError(
        f'assign works on one image: anchors [N, 4], gt_boxes [M, 4], '
        f'gt_classes [M]; got shapes {anchors.shape}, {gt_boxes.shape}, '
        f'{gt_classes.shape} (use assign_batch for a batch)')
  if is_crowd is None:
    is_crowd = jnp.zeros(gt_classes.shape, bool)
  out = _assign(anchors, jnp.asarray(gt_boxes)[None],
                jnp.asarray(gt_classes)[None], jnp.asarray(is_crowd)[None],
                match_threshold, unmatched_threshold, matcher)
  return {k: v[0] for k, v in out.items()}


def assign_batch(anchors: Array, gt_boxes: Array, gt_classes: Array,
                 is_crowd: Array | None = None,
                 match_threshold: float = 0.5,
                 unmatched_threshold: float = 0.5,
                 matcher: str = 'auto') -> dict[str, Array]:
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
  return _assign(anchors, gt_boxes, gt_classes, is_crowd, match_threshold,
                 unmatched_threshold, matcher)
