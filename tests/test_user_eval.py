"""Evaluation in the user's terms: their image and category ids, their
ground-truth JSON, a COCO results file, AP per class. No model is run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import coco as coco_lib

from spinenet_jax import evaluation

USER_IDS = {1: 7, 2: 42, 3: 1000}  # class id -> the user's category id.
NAMES = {1: 'circle', 2: 'square', 3: 'triangle'}


def _groundtruth(tmp_path):
  """Two images (ids 9001, 9002) with boxes in the user's ids, on disk."""
  boxes = {9001: [([10, 20, 30, 40], 7), ([50, 50, 20, 10], 1000)],
           9002: [([5, 5, 60, 30], 42)]}
  gt = {'images': [{'id': i, 'height': 100, 'width': 120} for i in boxes],
        'annotations': [{'id': n + 1, 'image_id': i, 'category_id': c,
                         'bbox': b, 'area': b[2] * b[3], 'iscrowd': 0}
                        for n, (i, b, c) in enumerate(
                            (i, b, c) for i in boxes for b, c in boxes[i])],
        'categories': [{'id': c, 'name': NAMES[k]}
                       for k, c in USER_IDS.items()]}
  path = tmp_path / 'val.json'
  path.write_text(json.dumps(gt))
  return str(path), boxes


def _records(boxes: dict) -> dict[str, np.ndarray]:
  """Detections equal to the ground truth, in class ids (yxyx pixels)."""
  from_user = {c: k for k, c in USER_IDS.items()}
  ids = sorted(boxes)
  d = max(len(v) for v in boxes.values())
  det = np.zeros([len(ids), d, 4], np.float32)
  cls = np.zeros([len(ids), d], np.int64)
  for i, image_id in enumerate(ids):
    for j, ((x, y, w, h), c) in enumerate(boxes[image_id]):
      det[i, j] = [y, x, y + h, x + w]
      cls[i, j] = from_user[c]
  return {'image_id': np.asarray(ids), 'det_boxes': det,
          'det_scores': (cls > 0).astype(np.float32) * 0.9,
          'det_classes': cls, 'num_detections': (cls > 0).sum(1),
          # The records' own ground truth is not used with a JSON given.
          'gt_boxes': np.zeros([len(ids), 0, 4], np.float32),
          'gt_classes': np.zeros([len(ids), 0], np.int64),
          'gt_is_crowd': np.zeros([len(ids), 0], np.int64),
          'gt_area': np.zeros([len(ids), 0], np.float32),
          'height': np.full([len(ids)], 100), 'width': np.full([len(ids)], 120)}


def test_ap_is_one_in_the_users_ids_and_results_load(tmp_path):
  gt_path, boxes = _groundtruth(tmp_path)
  results = tmp_path / 'detections_5.json'
  metrics = evaluation.evaluate_records(
      _records(boxes), user_ids=USER_IDS, groundtruth_json=gt_path,
      results_path=str(results), names=NAMES)
  assert metrics['AP'] == pytest.approx(1.0)
  assert metrics['AP50'] == pytest.approx(1.0)
  per_class = {k: v for k, v in metrics.items() if k.startswith('AP/')}
  assert per_class == pytest.approx({'AP/circle': 1.0, 'AP/square': 1.0,
                                     'AP/triangle': 1.0})
  rows = json.loads(results.read_text())
  assert {r['image_id'] for r in rows} == {9001, 9002}
  assert {r['category_id'] for r in rows} == {7, 42, 1000}
  gt = coco_lib.COCO(gt_path)
  dt = gt.loadRes(str(results))
  assert len(dt.getAnnIds()) == 3
  report = evaluation.format_per_class(metrics)
  assert 'AP per class' in report and 'triangle' in report


def test_wrong_class_costs_that_class(tmp_path):
  gt_path, boxes = _groundtruth(tmp_path)
  records = _records(boxes)
  records['det_classes'][1, 0] = 1  # 9002's square called a circle.
  metrics = evaluation.evaluate_records(
      records, user_ids=USER_IDS, groundtruth_json=gt_path, names=NAMES)
  assert metrics['AP/square'] == 0.0
  assert metrics['AP/triangle'] == pytest.approx(1.0)
  assert metrics['AP'] < 1.0


def test_per_class_table_is_capped_at_20():
  metrics = {f'AP/c{i}': 0.5 for i in range(25)}
  text = evaluation.format_per_class(metrics)
  assert text.count('c') >= 20 and '5 more classes' in text
