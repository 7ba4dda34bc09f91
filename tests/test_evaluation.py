"""COCO evaluation (pycocotools) and top-k accuracy."""
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from spinenet_jax import evaluation


def _gt(rng, num_images=4, max_instances=6, size=300.0):
  yx = rng.uniform(0, size - 80, (num_images, max_instances, 2))
  hw = rng.uniform(20, 80, (num_images, max_instances, 2))
  boxes = np.concatenate([yx, yx + hw], -1).astype(np.float32)
  classes = rng.choice([1, 3, 17, 90], (num_images, max_instances))
  for i in range(num_images):
    classes[i, rng.integers(2, max_instances + 1):] = -1  # padding
  return {'image_id': np.arange(num_images) + 100, 'boxes': boxes,
          'classes': classes}


def _perfect(gt, d=10):
  b, m = gt['classes'].shape
  boxes = np.zeros((b, d, 4), np.float32)
  boxes[:, :m] = gt['boxes']
  classes = np.zeros((b, d), np.int64)
  classes[:, :m] = np.maximum(gt['classes'], 0)
  scores = np.where(classes > 0, 0.9, 0.0)
  return {'boxes': boxes, 'scores': scores, 'classes': classes,
          'num_detections': (classes > 0).sum(1)}


def test_coco_eval_perfect_and_disjoint():
  rng = np.random.default_rng(0)
  gt = _gt(rng)
  res = evaluation.coco_eval(_perfect(gt), gt)
  assert set(res) == set(evaluation.COCO_METRICS)
  for k in ('AP', 'AP50', 'AP75', 'ARmax100'):
    assert res[k] == pytest.approx(1.0), k
  # Boxes moved far away: no overlap with any ground truth.
  pred = _perfect(gt)
  pred['boxes'] = pred['boxes'] + 1000.0
  res = evaluation.coco_eval(pred, gt)
  assert res['AP'] == 0.0 and res['AP50'] == 0.0 and res['ARmax100'] == 0.0
  # Right boxes, wrong classes.
  pred = _perfect(gt)
  pred['classes'] = np.where(pred['classes'] > 0, 2, 0)
  assert evaluation.coco_eval(pred, gt)['AP'] == 0.0


def test_coco_eval_box_conversion_and_area():
  """One 10x40 box: x/y order matters for IoU with a 40x10 prediction."""
  gt = {'image_id': np.array([1]), 'classes': np.array([[5]]),
        'boxes': np.array([[[10.0, 20.0, 20.0, 60.0]]])}  # h 10, w 40
  pred = {'boxes': np.array([[[10.0, 20.0, 20.0, 60.0]]]),
          'scores': np.array([[0.8]]), 'classes': np.array([[5]])}
  res = evaluation.coco_eval(pred, gt)
  assert res['AP'] == pytest.approx(1.0)
  assert res['APs'] == pytest.approx(1.0)  # area 400 < 32^2
  assert res['APm'] == -1.0  # no medium ground truth
  # A given area overrides the box area for the size ranges.
  res = evaluation.coco_eval(pred, dict(gt, area=np.array([[5000.0]])))
  assert res['APm'] == pytest.approx(1.0) and res['APs'] == -1.0
  xywh = evaluation.yxyx_to_xywh(gt['boxes'][0])
  np.testing.assert_allclose(xywh, [[20.0, 10.0, 40.0, 10.0]])


def test_coco_eval_crowd_and_mask():
  gt = {'image_id': np.array([1, 2, 2]), 'classes': np.array([[1, 1], [1, -1],
                                                              [1, -1]]),
        'boxes': np.array([[[0, 0, 50, 50], [100, 100, 200, 200]],
                           [[0, 0, 60, 60], [0, 0, 0, 0]],
                           [[0, 0, 60, 60], [0, 0, 0, 0]]], np.float32),
        'is_crowd': np.array([[0, 1], [0, 0], [0, 0]])}
  # Detections: the real object, plus two inside the crowd region.
  pred = {'boxes': np.array([[[0, 0, 50, 50], [110, 110, 150, 150],
                              [150, 150, 200, 200]],
                             [[0, 0, 60, 60], [0, 0, 0, 0], [0, 0, 0, 0]],
                             [[300, 300, 310, 310], [0, 0, 0, 0],
                              [0, 0, 0, 0]]], np.float32),
          'scores': np.array([[0.9, 0.95, 0.95], [0.9, 0, 0], [0.99, 0, 0]]),
          'classes': np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0]]),
          'num_detections': np.array([3, 1, 1])}
  # Crowd matches are ignored, not false positives; the third row is padding
  # (a repeated image id) and is dropped by the mask.
  res = evaluation.coco_eval(pred, gt, mask=np.array([True, True, False]))
  assert res['AP'] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='duplicate image_id'):
    evaluation.coco_eval(pred, gt)


def test_evaluator_accumulates_batches():
  rng = np.random.default_rng(1)
  gt = _gt(rng, num_images=6)
  pred = _perfect(gt)
  pred['boxes'][3:] += 1000.0  # the second half is wrong
  ev = evaluation.CocoEvaluator()
  for sl in (slice(0, 3), slice(3, 6)):
    ev.add({k: v[sl] for k, v in pred.items()},
           {k: v[sl] for k, v in gt.items()})
  whole = evaluation.coco_eval(pred, gt)
  assert ev.result() == whole
  assert 0.0 < whole['AP'] < 1.0


def test_gather_records_two_processes():
  """Simulates two processes with different image counts and pad sizes."""
  rng = np.random.default_rng(2)
  gt = _gt(rng, num_images=5)
  pred = _perfect(gt)
  pred['boxes'][1] += 2.0
  parts = [evaluation.CocoEvaluator(), evaluation.CocoEvaluator()]
  parts[0].add({k: v[:2] for k, v in pred.items()},
               {k: v[:2] for k, v in gt.items()})
  # Process 1 has fewer padded detections and ground-truth slots.
  parts[1].add({k: v[2:, :7] if v.ndim > 1 else v[2:] for k, v in pred.items()},
               {k: v[2:, :5] if v.ndim > 1 else v[2:] for k, v in gt.items()})
  slots, barrier, results = [None, None], threading.Barrier(2), [None, None]

  def run(pid):
    def gather(tree):
      slots[pid] = tree
      barrier.wait()
      out = _stack_trees(slots)
      barrier.wait()
      return out
    results[pid] = parts[pid].result(gather_fn=gather)

  threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  gt['classes'][2:, 5:] = -1  # what process 1 saw
  expected = evaluation.coco_eval(pred, gt)
  assert results[0] == results[1] == expected


def _stack_trees(trees):
  if isinstance(trees[0], dict):
    return {k: np.stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def test_single_process_gather_is_identity():
  rec = {'a': np.arange(3)}
  assert evaluation.gather_records(rec)['a'] is rec['a']


def test_no_detections():
  gt = _gt(np.random.default_rng(3))
  pred = _perfect(gt)
  pred['num_detections'][:] = 0
  assert evaluation.coco_eval(pred, gt)['AP'] == 0.0


def test_topk_accuracy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(64, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 64)
  mask = rng.random(64) < 0.7
  for k in (1, 5):
    topk = np.argsort(-logits, axis=1)[:, :k]
    correct = np.array([labels[i] in topk[i] for i in range(64)])
    np.testing.assert_allclose(
        evaluation.topk_accuracy(jnp.asarray(logits), jnp.asarray(labels), k),
        correct.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        evaluation.topk_accuracy(logits, labels, k, mask=mask),
        correct[mask].mean(), rtol=1e-6)
    one_hot = np.eye(10)[labels]
    np.testing.assert_allclose(evaluation.topk_accuracy(logits, one_hot, k),
                               correct.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match='k must be'):
    evaluation.topk_accuracy(logits, labels, 0)
