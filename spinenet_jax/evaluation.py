"""Evaluation: COCO box AP through pycocotools, and top-k accuracy.

COCO evaluation collects per-image numpy records on each process, gathers
them to every process (`gather_records`; a no-op with one process) and runs
the reference `pycocotools` evaluator on the union.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'ARmax1',
                'ARmax10', 'ARmax100', 'ARs', 'ARm', 'ARl')

# Fill values used when padding record arrays to a common shape.
_PAD_VALUES = {'gt_classes': -1}
_RECORD_KEYS = ('image_id', 'det_boxes', 'det_scores', 'det_classes',
                'num_detections', 'gt_boxes', 'gt_classes', 'gt_is_crowd',
                'gt_area', 'height', 'width')
_EMPTY_SHAPES = {'det_boxes': (0, 0, 4), 'gt_boxes': (0, 0, 4),
                 'det_scores': (0, 0), 'det_classes': (0, 0),
                 'gt_classes': (0, 0), 'gt_is_crowd': (0, 0),
                 'gt_area': (0, 0)}
_EMPTY_DTYPES = {'det_boxes': np.float32, 'gt_boxes': np.float32,
                 'det_scores': np.float32, 'gt_area': np.float32}


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray,
                 k: int = 1) -> jnp.ndarray:
  """`[B]` bool: the label is among the top `k` logits.

  `labels` are int `[B]` or one-hot / soft `[B, C]` (argmax is used). A label
  counts as correct when fewer than `k` logits are strictly larger than its
  own (ties favour the label). No sort, so it is cheap inside `jax.jit`.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  if labels.ndim == logits.ndim:
    labels = jnp.argmax(labels, axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  return jnp.sum(logits > label_logit, axis=-1) < k


def topk_accuracy(logits: jnp.ndarray, labels: jnp.ndarray, k: int = 1,
                  mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Fraction of (unmasked) examples whose label is in the top `k` logits.

  `mask` is `[B]`, true (or 1) for real examples; padding is excluded. Returns
  0 when every example is masked.
  """
  correct = topk_correct(logits, labels, k).astype(jnp.float32)
  if mask is None:
    mask = jnp.ones_like(correct)
  mask = mask.astype(jnp.float32)
  return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
  """(ymin, xmin, ymax, xmax) -> COCO (x, y, width, height)."""
  boxes = np.asarray(boxes, np.float64)
  return np.stack([boxes[..., 1], boxes[..., 0], boxes[..., 3] - boxes[..., 1],
                   boxes[..., 2] - boxes[..., 0]], axis=-1)


def _pad_to(x: np.ndarray, shape: Sequence[int], value) -> np.ndarray:
  widths = [(0, int(s) - d) for s, d in zip(shape, x.shape)]
  return np.pad(x, widths, constant_values=value)


def gather_records(records: Mapping[str, np.ndarray],
                   gather_fn: Callable[[Any], Any] | None = None
                   ) -> dict[str, np.ndarray]:
  """Concatenates every process's records (leading axis = images).

  Arrays may differ in size between processes (number of images, padded
  boxes per image); they are padded to the largest size, gathered with
  `gather_fn` (default `multihost_utils.process_allgather`, which stacks a
  new leading process axis), then unpadded. With one process and no
  `gather_fn` the records are returned unchanged. Every process must call
  this (it is a collective).
  """
  if gather_fn is None:
    if jax.process_count() == 1:
      return dict(records)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gather_fn = multihost_utils.process_allgather
  keys = sorted(records)
  shapes = np.asarray(gather_fn(np.asarray(
      [d for k in keys for d in records[k].shape], np.int64)))
  max_shape = shapes.max(axis=0)
  counts = shapes[:, 0]  # every record's leading axis is the image count
  padded, offset = {}, 0
  for k in keys:
    x = records[k]
    target = max_shape[offset:offset + x.ndim]
    offset += x.ndim
    padded[k] = _pad_to(x, target, _PAD_VALUES.get(k, 0))
  gathered = gather_fn(padded)
  return {k: np.concatenate([np.asarray(gathered[k][p, :n])
                             for p, n in enumerate(counts)], axis=0)
          for k in keys}


def _concat_padded(chunks: Sequence[np.ndarray], value) -> np.ndarray:
  shape = np.max([c.shape for c in chunks], axis=0)
  return np.concatenate([_pad_to(c, (c.shape[0],) + tuple(shape[1:]), value)
                         for c in chunks], axis=0)


class CocoEvaluator:
  """Accumulates detections and ground truth; `result()` runs pycocotools.

  Boxes are (ymin, xmin, ymax, xmax) in original-image pixels; classes are
  COCO category ids (>= 1).

  `add(predictions, groundtruth, mask=None)` takes numpy (or host) arrays
  with a leading batch axis:

  - predictions: `boxes [B, D, 4]`, `scores [B, D]`, `classes [B, D]`, and
    optionally `num_detections [B]` (else all D count). Detections with class
    <= 0 are ignored.
  - groundtruth: `image_id [B]` (int), `boxes [B, M, 4]`, `classes [B, M]`
    (<= 0 marks padding), optional `is_crowd [B, M]`, `area [B, M]` (box area
    where absent or <= 0), `height [B]`, `width [B]`, and `mask [B]`.
  - mask: `[B]` bool, False for padding examples, which are dropped (taken
    from `groundtruth['mask']` when not given).
  """

  def __init__(self, category_ids: Sequence[int] | None = None,
               verbose: bool = False):
    """`category_ids`: categories to evaluate (default: those in the GT)."""
    self.category_ids = None if category_ids is None else [
        int(c) for c in category_ids]
    self.verbose = verbose
    self.reset()

  def reset(self) -> None:
    self._chunks: list[dict[str, np.ndarray]] = []

  def add(self, predictions: Mapping[str, Any], groundtruth: Mapping[str, Any],
          mask: Any | None = None) -> None:
    """Adds one (process-local) batch; see the class docstring."""
    image_id = np.asarray(groundtruth['image_id']).reshape(-1).astype(np.int64)
    b = image_id.shape[0]
    if mask is None:
      mask = groundtruth.get('mask', np.ones([b], bool))
    mask = np.asarray(mask).reshape(-1).astype(bool)
    det_boxes = np.asarray(predictions['boxes'], np.float32)
    det_scores = np.asarray(predictions['scores'], np.float32)
    det_classes = np.asarray(predictions['classes']).astype(np.int64)
    num_det = np.asarray(predictions.get(
        'num_detections', np.full([b], det_scores.shape[-1]))).astype(np.int64)
    gt_boxes = np.asarray(groundtruth['boxes'], np.float32)
    gt_classes = np.asarray(groundtruth['classes']).astype(np.int64)
    m = gt_classes.shape[-1]
    is_crowd = np.asarray(groundtruth.get('is_crowd', np.zeros([b, m])))
    area = np.asarray(groundtruth.get('area', np.zeros([b, m])), np.float32)
    chunk = {
        'image_id': image_id, 'det_boxes': det_boxes,
        'det_scores': det_scores, 'det_classes': det_classes,
        'num_detections': num_det, 'gt_boxes': gt_boxes,
        'gt_classes': gt_classes, 'gt_is_crowd': is_crowd.astype(np.int64),
        'gt_area': area,
        'height': np.asarray(groundtruth.get('height', np.zeros([b])),
                             np.int64).reshape(-1),
        'width': np.asarray(groundtruth.get('width', np.zeros([b])),
                            np.int64).reshape(-1),
    }
    for k, v in chunk.items():
      if v.shape[0] != b or mask.shape[0] != b:
        raise ValueError(f'{k} has leading size {v.shape[0]} (mask '
                         f'{mask.shape[0]}), expected batch size {b}')
    for k in ('det_boxes', 'gt_boxes'):
      if chunk[k].ndim != 3 or chunk[k].shape[-1] != 4:
        raise ValueError(f'{k} must be [B, n, 4], got {chunk[k].shape}')
    self._chunks.append({k: v[mask] for k, v in chunk.items()})

  def records(self) -> dict[str, np.ndarray]:
    """This process's records, concatenated over the added batches."""
    if not self._chunks:  # still takes part in the gather
      return {k: np.zeros(_EMPTY_SHAPES.get(k, (0,)), _EMPTY_DTYPES.get(
          k, np.int64)) for k in _RECORD_KEYS}
    return {k: _concat_padded([c[k] for c in self._chunks],
                              _PAD_VALUES.get(k, 0))
            for k in self._chunks[0]}

  def result(self, gather_fn: Callable[[Any], Any] | None = None,
             **kwargs) -> dict[str, float]:
    """Gathers all processes' records and returns the COCO box metrics.

    A collective with several processes: every process must call it.
    `kwargs` go to `evaluate_records` (user ids, a ground-truth JSON, a
    results path, class names). Returns
    `{name: float}` for `COCO_METRICS`; -1 where pycocotools finds no ground
    truth (e.g. no small objects), and 0 for everything when there are no
    detections at all.
    """
    return evaluate_records(gather_records(self.records(), gather_fn),
                            self.category_ids, self.verbose, **kwargs)


def _coco_datasets(records: Mapping[str, np.ndarray],
                   category_ids: Sequence[int] | None):
  """pycocotools GT dataset dict and `[K, 7]` detection array."""
  image_ids = records['image_id']
  uniq, counts = np.unique(image_ids, return_counts=True)
  if np.any(counts > 1):
    raise ValueError(f'duplicate image_id values {uniq[counts > 1][:10]}; '
                     f'mask out repeated padding examples')
  images, annotations = [], []
  gt_xywh = yxyx_to_xywh(records['gt_boxes'])
  for i, image_id in enumerate(image_ids):
    image = {'id': int(image_id)}
    if records['height'][i] > 0 and records['width'][i] > 0:
      image.update(height=int(records['height'][i]),
                   width=int(records['width'][i]))
    images.append(image)
    for j in np.nonzero(records['gt_classes'][i] > 0)[0]:
      x, y, w, h = (float(v) for v in gt_xywh[i, j])
      area = float(records['gt_area'][i, j])
      annotations.append({
          'id': len(annotations) + 1,  # pycocotools treats id 0 as unmatched
          'image_id': int(image_id),
          'category_id': int(records['gt_classes'][i, j]),
          'bbox': [x, y, w, h],
          'area': area if area > 0 else w * h,
          'iscrowd': int(records['gt_is_crowd'][i, j] > 0),
      })
  if category_ids is None:
    category_ids = sorted({a['category_id'] for a in annotations})
  dataset = {'images': images, 'annotations': annotations,
             'categories': [{'id': int(c)} for c in category_ids]}

  d = records['det_scores'].shape[1]
  valid = ((np.arange(d)[None, :] < records['num_detections'][:, None]) &
           (records['det_classes'] > 0))
  img = np.broadcast_to(image_ids[:, None], valid.shape)
  dets = np.concatenate([
      img[valid][:, None].astype(np.float64),
      yxyx_to_xywh(records['det_boxes'])[valid],
      records['det_scores'][valid][:, None].astype(np.float64),
      records['det_classes'][valid][:, None].astype(np.float64)], axis=1)
  return dataset, dets


def evaluate_records(records: Mapping[str, np.ndarray],
                     category_ids: Sequence[int] | None = None,
                     verbose: bool = False, *,
                     user_ids: Mapping[int, int] | None = None,
                     groundtruth_json: str | None = None,
                     results_path: str | None = None,
                     names: Mapping[int, str] | None = None
                     ) -> dict[str, float]:
  """Runs pycocotools' box evaluation on gathered records.

  Args:
    records: gathered records (`CocoEvaluator.records`).
    category_ids: class ids to evaluate (default: those in the GT).
    verbose: print pycocotools' summary.
    user_ids: class id -> the user's category id; detections are written
      and evaluated in those ids (identity where missing).
    groundtruth_json: a COCO ground-truth file in the user's ids to evaluate
      against instead of the records' ground truth (only its images that
      were evaluated count).
    results_path: where to write the detections as a COCO results JSON.
    names: class id -> name: adds `AP/<name>` per class with ground truth.
  """
  from pycocotools import coco as coco_lib  # pylint: disable=g-import-not-at-top
  from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top
  dataset, dets = _coco_datasets(records, category_ids)
  to_user = dict(user_ids or {})
  if to_user and dets.shape[0]:
    dets[:, 6] = [to_user.get(int(c), int(c)) for c in dets[:, 6]]
  if results_path:
    write_results(results_path, dets)
  if groundtruth_json is None and not dataset['categories']:
    return {k: -1.0 for k in COCO_METRICS}
  if dets.shape[0] == 0:
    return {k: 0.0 for k in COCO_METRICS}
  out = io.StringIO()
  quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(
      out)
  with quiet:
    if groundtruth_json:
      gt = coco_lib.COCO(groundtruth_json)
    else:
      gt = coco_lib.COCO()
      gt.dataset = {**dataset, 'categories': [
          {'id': to_user.get(c['id'], c['id'])} for c in dataset['categories']]}
      for a in gt.dataset['annotations']:
        a['category_id'] = to_user.get(a['category_id'], a['category_id'])
      gt.createIndex()
    dt = gt.loadRes(dets)
    ev = cocoeval.COCOeval(gt, dt, iouType='bbox')
    ev.params.imgIds = sorted(int(i) for i in np.unique(records['image_id']))
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  metrics = {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}
  if names:
    from_user = {u: c for c, u in to_user.items()}
    for cat, ap in per_class_ap(ev).items():
      c = from_user.get(cat, cat)
      metrics[f'AP/{names.get(c, f"class {c}")}'] = ap
  return metrics


def per_class_ap(ev: Any) -> dict[int, float]:
  """Category id -> AP @[IoU=0.50:0.95] (all areas, 100 detections) of an
  accumulated COCOeval; categories without ground truth are left out."""
  precision = ev.eval['precision']  # [T, R, K, A, M]
  out = {}
  for k, cat in enumerate(ev.params.catIds):
    p = precision[:, :, k, 0, -1]
    if np.any(p > -1):
      out[int(cat)] = float(np.mean(p[p > -1]))
  return out


def write_results(path: str, dets: np.ndarray) -> None:
  """`[K, 7]` (image id, x, y, w, h, score, category) as a COCO results
  JSON (a list of {image_id, category_id, bbox, score}); process 0 only."""
  if jax.process_index() != 0:
    return
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  rows = [{'image_id': int(d[0]), 'category_id': int(d[6]),
           'bbox': [round(float(v), 2) for v in d[1:5]],
           'score': round(float(d[5]), 5)} for d in dets]
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(rows, f)
  os.replace(tmp, path)


def format_per_class(metrics: Mapping[str, float], limit: int = 20) -> str:
  """The `AP/<name>` entries as a table of up to `limit` classes."""
  rows = [(k[3:], v) for k, v in metrics.items() if k.startswith('AP/')]
  if not rows:
    return ''
  lines = ['  AP per class:'] + [f'  {n:<22} {v:.3f}' for n, v in rows[:limit]]
  if len(rows) > limit:
    lines.append(f'  ... {len(rows) - limit} more classes in metrics.jsonl')
  return '\n'.join(lines)


def coco_eval(predictions: Mapping[str, Any], groundtruth: Mapping[str, Any],
              mask: Any | None = None,
              category_ids: Sequence[int] | None = None,
              verbose: bool = False) -> dict[str, float]:
  """One-call COCO box metrics for arrays with a leading image axis.

  See `CocoEvaluator` for the array formats. With several processes each
  passes its own images and every process gets the combined result.
  """
  evaluator = CocoEvaluator(category_ids, verbose)
  evaluator.add(predictions, groundtruth, mask)
  return evaluator.result()


COCO_TABLE = (
    ('AP', 'AP @[IoU=0.50:0.95]'), ('AP50', 'AP @[IoU=0.50]'),
    ('AP75', 'AP @[IoU=0.75]'), ('APs', 'AP small'), ('APm', 'AP medium'),
    ('APl', 'AP large'), ('ARmax1', 'AR max=1'), ('ARmax10', 'AR max=10'),
    ('ARmax100', 'AR max=100'), ('ARs', 'AR small'), ('ARm', 'AR medium'),
    ('ARl', 'AR large'))


def format_coco(metrics: Mapping[str, float]) -> str:
  """The COCO AP table (the keys of `CocoEvaluator.result`) as text."""
  return '\n'.join(f'  {label:<22} {metrics[k]:.3f}' for k, label in COCO_TABLE
                   if k in metrics)
