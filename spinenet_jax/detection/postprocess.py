"""RetinaNet post-processing: candidate selection and per-class NMS, in JAX.

Semantics of `detect` for each image (all static shapes, jit and vmap safe):

1. Scores are `sigmoid(logits)` with class column 0 (background) dropped;
   reported classes are the column indices, i.e. ids >= 1.
2. Candidates are the `pre_nms_top_k` highest-scoring (anchor, class) pairs
   over all anchors and classes, in descending score order. (Found exactly in
   two steps: the top `pre_nms_top_k` anchors by their best class, then the
   top pairs among those anchors.) Pairs scoring `<= score_threshold` are
   dropped. Boxes are decoded against the anchors and clipped to the image.
3. Greedy per-class NMS over the candidates in score order: a candidate is
   kept if its IoU with every kept box *of the same class* is
   `<= iou_threshold`; it stops after `max_detections` kept boxes.

Model Garden (`nms_version='v2'`) takes the top `pre_nms_top_k` anchors per
class, runs NMS per class and keeps the best `max_detections` over classes.
Its candidate list is a superset of ours, and ours is its prefix in score
order, so the results are the same (up to ties) unless more than
`pre_nms_top_k` pairs pass the threshold *and* fewer than `max_detections`
survive NMS among the first `pre_nms_top_k`; then we may return fewer boxes.

NMS runs in tiles of `tile_size` candidates: each tile is suppressed by the
boxes kept so far, then within itself by a fixed-point iteration that equals
sequential greedy NMS (usually a few passes per tile). It stops at the first
tile whose best candidate is below the threshold or when `max_detections`
boxes are kept, so it does `O(pre_nms_top_k * (tile_size + max_detections))`
work, not O(K^2).

Images are processed with `vmap`, or (the CPU default) one after another
within each device's shard of the batch, which avoids batch-sized
temporaries of the `[B, N, C]` logits and lock-step NMS loops.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spinenet_jax import sharding_utils
from spinenet_jax.detection import box_ops
from spinenet_jax.detection import outputs as outputs_lib

Array = jnp.ndarray


def _pairwise_suppression(boxes1: Array, classes1: Array, boxes2: Array,
                          classes2: Array, iou_threshold: float) -> Array:
  """`[N, M]` bool: box i of set 1 and box j of set 2 suppress each other."""
  same = classes1[:, None] == classes2[None, :]
  return same & (box_ops.iou(boxes1, boxes2) > iou_threshold)


def nms(boxes: Array, classes: Array, valid: Array, max_output: int,
        iou_threshold: float = 0.5, tile_size: int = 256) -> tuple[Array, Array]:
  """Greedy per-class NMS of candidates already sorted by descending score.

  Args:
    boxes: `[K, 4]` yxyx boxes.
    classes: `[K]` int classes; boxes of different classes never suppress
      each other.
    valid: `[K]` bool, a prefix mask (candidates below the score threshold
      must all come after the valid ones).
    max_output: number of boxes to keep at most.
    iou_threshold: a candidate is suppressed by a kept box of its class with
      IoU strictly greater than this.
    tile_size: candidates processed together.

  Returns:
    `indices [max_output]` int32 into the candidates (-1 past the end) and
    the number kept.
  """
  k = boxes.shape[0]
  tile_size = int(min(tile_size, max(k, 1)))
  num_tiles = -(-k // tile_size)
  pad = num_tiles * tile_size - k
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  classes = jnp.pad(classes, (0, pad))
  valid = jnp.pad(valid, (0, pad))
  order = jnp.arange(tile_size)
  earlier = order[:, None] < order[None, :]  # [j, i]: j comes before i
  slots = jnp.arange(max_output)

  def cond(state):
    t, count = state[0], state[1]
    first = jnp.minimum(t * tile_size, num_tiles * tile_size - 1)
    return (t < num_tiles) & (count < max_output) & valid[first]

  # One loop, one pass per iteration. Within a tile, `keep` iterates
  # keep <- base & ~any_j(keep[j] & within[j, i]); each pass fixes at least
  # one more position, and the fixed point is the sequential greedy result.
  # Once `keep` stops changing the tile is committed and the next one begins.
  def body(state):
    t, count, keep, kept_idx, kept_boxes, kept_cls = state
    start = t * tile_size
    b = jax.lax.dynamic_slice_in_dim(boxes, start, tile_size)
    c = jax.lax.dynamic_slice_in_dim(classes, start, tile_size)
    v = jax.lax.dynamic_slice_in_dim(valid, start, tile_size)
    by_kept = _pairwise_suppression(b, c, kept_boxes, kept_cls, iou_threshold)
    base = v & ~jnp.any(by_kept & (slots < count)[None, :], axis=1)
    within = _pairwise_suppression(b, c, b, c, iou_threshold) & earlier
    new = base & ~jnp.any(within & keep[:, None], axis=0)
    done = jnp.all(new == keep)
    commit = keep & done
    pos = jnp.where(commit, count + jnp.cumsum(commit) - 1, max_output)
    kept_idx = kept_idx.at[pos].set(start + order, mode='drop')
    kept_boxes = kept_boxes.at[pos].set(b, mode='drop')
    kept_cls = kept_cls.at[pos].set(c, mode='drop')
    count = jnp.minimum(count + jnp.sum(commit), max_output)
    keep = jnp.where(done, jnp.zeros_like(keep), new)
    return t + done.astype(t.dtype), count, keep, kept_idx, kept_boxes, kept_cls

  # The carry is derived from `valid` so that, under `vmap` of a batch on an
  # explicit-sharding mesh, it is batched (and sharded) from the start: a
  # carry that only becomes batched inside the loop fails to trace there.
  zero = jnp.zeros_like(valid[0], jnp.int32)
  init = (zero, zero, jnp.zeros((tile_size,), bool) & valid[0],
          jnp.full((max_output,), -1, jnp.int32) + zero,
          jnp.zeros((max_output, 4), boxes.dtype) + zero.astype(boxes.dtype),
          jnp.full((max_output,), -1, classes.dtype) + zero.astype(
              classes.dtype))
  _, count, _, kept_idx, _, _ = jax.lax.while_loop(cond, body, init)
  return kept_idx, count


def _gather_levels(levels: Sequence[Array], idx: Array) -> Array:
  """Rows `idx` of the concatenation of `levels` (`[N_l, D]`), no concat."""
  out, offset = None, 0
  for x in levels:
    n = x.shape[0]
    rows = x[jnp.clip(idx - offset, 0, n - 1)]
    inside = ((idx >= offset) & (idx < offset + n))[:, None]
    out = rows if out is None else jnp.where(inside, rows, out)
    offset += n
  return out


def _detect_one(cls_levels: list[Array], box_levels: list[Array],
                image_hw: Array, anchor_levels: list[Array],
                pre_nms_top_k: int, score_threshold: float,
                iou_threshold: float, max_detections: int,
                tile_size: int) -> dict[str, Array]:
  """`detect` for one image given per-level `[N_l, C]` and `[N_l, 4]` arrays."""
  cls_levels = [c.astype(jnp.float32) for c in cls_levels]
  num_classes = cls_levels[0].shape[1]
  # Top anchors by their best foreground logit, then the top (anchor, class)
  # pairs among them: exact, since an anchor holding one of the k best pairs
  # has one of the k best per-anchor maxima.
  key = jnp.concatenate([jnp.max(c[:, 1:], axis=1) for c in cls_levels])
  _, anchor_idx = jax.lax.top_k(key, min(pre_nms_top_k, key.shape[0]))
  pair_logits = _gather_levels(cls_levels, anchor_idx)[:, 1:].reshape(-1)
  top_logits, flat = jax.lax.top_k(
      pair_logits, min(pre_nms_top_k, pair_logits.shape[0]))
  anchor_idx = anchor_idx[flat // (num_classes - 1)]
  classes = flat % (num_classes - 1) + 1
  scores = jax.nn.sigmoid(top_logits)
  # Decoding every anchor is cheap and elementwise, so the constant anchors
  # are never gathered with (possibly batch-sharded) indices.
  decoded = [box_ops.decode(b.astype(jnp.float32), a)
             for b, a in zip(box_levels, anchor_levels)]
  boxes = box_ops.clip(_gather_levels(decoded, anchor_idx), image_hw)
  idx, count = nms(boxes, classes, scores > score_threshold, max_detections,
                   iou_threshold, tile_size)
  ok = idx >= 0
  safe = jnp.maximum(idx, 0)
  return {
      'boxes': jnp.where(ok[:, None], boxes[safe], 0.0),
      'scores': jnp.where(ok, scores[safe], 0.0),
      'classes': jnp.where(ok, classes[safe], 0).astype(jnp.int32),
      'num_detections': count.astype(jnp.int32),
  }


def _split_levels(cls_outputs: Array | Mapping[Any, Array],
                  box_outputs: Array | Mapping[Any, Array]
                  ) -> tuple[list[Array], list[Array]]:
  """Per-level `[B, N_l, C]` logits and `[B, N_l, 4]` deltas, anchor order."""
  if isinstance(cls_outputs, Mapping):
    return outputs_lib.flatten_levels(cls_outputs, box_outputs)
  cls_outputs, box_outputs = jnp.asarray(cls_outputs), jnp.asarray(box_outputs)
  if (cls_outputs.ndim != 3 or
      box_outputs.shape != cls_outputs.shape[:2] + (4,)):
    raise ValueError(f'need cls_outputs [B, N, C] and box_outputs [B, N, 4];'
                     f' got {cls_outputs.shape} and {box_outputs.shape}')
  return [cls_outputs], [box_outputs]


def _map_images(fn: Callable[..., Any], args: Any) -> Any:
  """`lax.map` of `fn` over the leading axis of `args`, within each shard.

  The batch is split into `[n, B / n]`, vmapped over the first axis and
  looped over the second, so each device loops over its own images. `n` is
  the number of explicit shards of the batch; without explicit sharding
  (no mesh, or `Auto` axes) it is `gcd(B, device_count)`, so that a batch
  sharded over all devices by the partitioner stays where it is.
  """
  x = jax.tree.leaves(args)[0]
  n = sharding_utils.num_batch_shards(x)
  if sharding_utils.batch_axis(x) is None:
    n = math.gcd(x.shape[0], jax.device_count())
  if n == 1:
    return jax.lax.map(lambda a: fn(*a), args)
  split = jax.tree.map(lambda x: sharding_utils.split_batch(x, n), args)
  out = jax.vmap(lambda a: jax.lax.map(lambda b: fn(*b), a))(split)
  return jax.tree.map(sharding_utils.merge_batch, out)


def detect(cls_outputs: Array | Mapping[Any, Array],
           box_outputs: Array | Mapping[Any, Array],
           anchors: Array | np.ndarray,
           image_size: int | Sequence[int] | Array,
           pre_nms_top_k: int = 5000, score_threshold: float = 0.05,
           iou_threshold: float = 0.5, max_detections: int = 100,
           tile_size: int = 256,
           vectorize: bool | None = None) -> dict[str, Array]:
  """Turns RetinaNet outputs into at most `max_detections` boxes per image.

  Args:
    cls_outputs: `[B, N, C]` logits in anchor order (column 0 background), or
      the head's per-level dict `{level: [B, H, W, A * C]}` (preferred: the
      levels are never concatenated).
    box_outputs: `[B, N, 4]` (dy, dx, dh, dw), or the per-level dict.
    anchors: `[N, 4]` yxyx anchors (`anchors.multilevel_anchors`): a NumPy
      array (a constant of the compiled program) or a jax.Array, also a
      traced argument of a jitted caller.
    image_size: clip window: an int, `(height, width)`, or `[B, 2]` per image
      (e.g. the unpadded size of each resized image).
    pre_nms_top_k: number of (anchor, class) candidates entering NMS.
    score_threshold: candidates need a score strictly above this.
    iou_threshold: NMS suppresses IoU strictly above this (same class only).
    max_detections: detections kept per image.
    tile_size: NMS tile (speed only; results do not depend on it).
    vectorize: vmap over the batch (True) or loop over the images of each
      device shard (False). Default: loop on CPU, where it avoids large
      batched temporaries and lock-step NMS loops; vmap elsewhere. Results
      are the same.

  Returns:
    dict of `boxes [B, D, 4]` (yxyx, input pixels), `scores [B, D]`,
    `classes [B, D]` int32 (ids >= 1) and `num_detections [B]` int32, with
    `D = max_detections`, sorted by descending score; entries past
    `num_detections` are zero.
  """
  cls_levels, box_levels = _split_levels(cls_outputs, box_outputs)
  num_anchors = sum(c.shape[1] for c in cls_levels)
  if tuple(anchors.shape) != (num_anchors, 4):
    raise ValueError(f'anchors have shape {tuple(anchors.shape)}, outputs '
                     f'have {num_anchors} anchors')
  if cls_levels[0].shape[2] < 2:
    raise ValueError(f'need at least 2 class columns (background + 1), got '
                     f'{cls_levels[0].shape[2]}')
  for name, value in (('pre_nms_top_k', pre_nms_top_k),
                      ('max_detections', max_detections),
                      ('tile_size', tile_size)):
    if int(value) < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  size = jnp.asarray(image_size, jnp.float32)
  if size.ndim == 0:
    size = jnp.stack([size, size])
  if size.shape not in ((2,), (cls_levels[0].shape[0], 2)):
    raise ValueError(f'image_size must be an int, (height, width) or [B, 2]; '
                     f'got shape {size.shape}')
  splits = np.cumsum([c.shape[1] for c in cls_levels])[:-1]
  # jnp.split, not np.split: `anchors` may be a traced jax.Array under jit.
  anchor_levels = jnp.split(jnp.asarray(anchors, jnp.float32), splits)
  ref = cls_levels[0]
  box_levels = [sharding_utils.batch_like(b, ref) for b in box_levels]
  cls_levels = [sharding_utils.batch_like(c, ref) for c in cls_levels]
  per_image = size.ndim == 2
  sizes = sharding_utils.batch_like(size, ref) if per_image else None

  def one(cls_l, box_l, image_hw):
    return _detect_one(cls_l, box_l, size if image_hw is None else image_hw,
                       anchor_levels, int(pre_nms_top_k), score_threshold,
                       iou_threshold, int(max_detections), int(tile_size))

  if vectorize is None:
    vectorize = jax.default_backend() != 'cpu'
  if vectorize:
    return jax.vmap(one)(cls_levels, box_levels, sizes)
  return _map_images(one, (cls_levels, box_levels, sizes))
