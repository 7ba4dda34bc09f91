"""load_checkpoint / Run.features / detect / classify.

On the session's tiny demo detection run (conftest.py `det_workdir`, with
EMA on so that the EMA path is covered) and tiny classification run
(`cls_reference`).
"""

import os

import jax
import numpy as np
import pytest

import spinenet_jax
from spinenet_jax import checkpoints
from spinenet_jax import inference
from spinenet_jax.detection import postprocess


def test_load_checkpoint(det_run, det_workdir):
  run = det_run
  assert run.step == 12
  assert isinstance(run.model, spinenet_jax.RetinaNet)
  assert run.config.data.image_size == 128
  assert run.ema_params is not None
  # The EMA weights are the inference weights.
  assert run.variables['params'] is run.ema_params
  assert set(run.variables) == {'params', 'batch_stats'}
  # Same run through the step directory and an explicit step.
  again = inference.load_checkpoint(
      os.path.join(det_workdir, 'checkpoints', '12'))
  assert again.step == 12
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.variables),
               jax.device_get(run.variables))
  with pytest.raises(FileNotFoundError, match='step 7'):
    inference.load_checkpoint(det_workdir, step=7)


def test_features(det_run, sample_images):
  feats = det_run.features(sample_images)
  assert sorted(feats) == [3, 4, 5, 6, 7]
  for level, f in feats.items():
    assert f.shape == (2, 128 >> level, 128 >> level, 16)
    assert np.isfinite(f).all()


def test_detect_list_of_sizes(det_run, sample_images):
  images = sample_images
  det = det_run.detect(images, score_threshold=0.0, max_detections=20)
  assert det['boxes'].shape == (2, 20, 4)
  assert det['scores'].shape == det['classes'].shape == (2, 20)
  assert det['num_detections'].shape == (2,)
  for i, im in enumerate(images):
    n = int(det['num_detections'][i])
    assert n > 0
    boxes = det['boxes'][i, :n]
    h, w = im.shape[:2]
    # In the image's own pixels: inside it, and reaching beyond the network's
    # 128-pixel input for the 200-pixel-high image.
    assert (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= h + 1e-3).all()
    assert (boxes[:, [1, 3]] <= w + 1e-3).all()
    assert (det['classes'][i, :n] >= 1).all()
    assert (det['classes'][i, :n] <= 3).all()
    assert np.all(np.diff(det['scores'][i, :n]) <= 1e-6)
  # Same as running the model on the padded resized batch, boxes / scale.
  batch, scales, sizes = inference.detection_inputs(images, 128)
  np.testing.assert_allclose(scales, [128 / 150, 128 / 200], rtol=1e-6)
  assert batch.shape == (2, 128, 128, 3)
  assert np.all(batch[1, :, 58:] == 0)  # 90 * 0.64 = 57.6 -> 58 columns.
  out = det_run.model.apply(det_run.variables, batch, train=False)
  ec = det_run.config.eval
  ref = postprocess.detect(
      out['cls_outputs'], out['box_outputs'],
      det_run.model.anchors(128),
      np.round(sizes * scales[:, None]), pre_nms_top_k=ec.pre_nms_top_k,
      score_threshold=0.0, iou_threshold=ec.iou_threshold, max_detections=20)
  np.testing.assert_array_equal(ref['num_detections'], det['num_detections'])
  np.testing.assert_allclose(det['scores'], ref['scores'], atol=1e-5)
  np.testing.assert_allclose(
      det['boxes'], np.minimum(np.asarray(ref['boxes']) / scales[:, None, None],
                               np.tile(sizes[:, None], (1, 1, 2))),
      atol=0.05)
  # A batch array gives the same result as the list for one size.
  one = det_run.detect(np.stack([images[0]] * 2), score_threshold=0.0,
                       max_detections=20)
  np.testing.assert_allclose(one['boxes'][0], det['boxes'][0], atol=1e-3)
  with pytest.raises(ValueError, match='classify'):
    det_run.classify(images)


def test_classify(cls_reference, sample_images):
  workdir = cls_reference.workdir
  run = spinenet_jax.load_checkpoint(workdir)
  assert run.step == 20
  assert isinstance(run.model, spinenet_jax.Classifier)
  assert run.ema_params is None
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(run.variables['params']),
               checkpoints.restore_arrays(workdir)['params'])
  out = run.classify(sample_images, k=2)
  assert out['classes'].shape == out['probabilities'].shape == (2, 2)
  assert np.all(out['probabilities'][:, 0] >= out['probabilities'][:, 1])
  assert all(lab in ('circle', 'square', 'triangle')
             for row in out['labels'] for lab in row)
  top = run.classify(sample_images, k=10)  # k is capped at the class count.
  np.testing.assert_allclose(top['probabilities'].sum(-1), 1.0, rtol=1e-5)
  feats = run.features(sample_images)
  assert sorted(feats) == [3, 4, 5, 6, 7]
  with pytest.raises(ValueError, match='detect'):
    run.detect(sample_images)
