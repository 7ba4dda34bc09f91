"""Detection and classification input pipelines on tiny shapes datasets and
on mocked `coco/2017` / `imagenet2012` (no download anywhere)."""
import io
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common as config_common
from input_pipeline import classification
from input_pipeline import common
from input_pipeline import contract
from input_pipeline import detection
from input_pipeline import shapes

SIZE = 128  # Network input side in these tests.
LO = (0 - np.array(contract.MEAN_RGB)) / np.array(contract.STDDEV_RGB)
HI = (1 - np.array(contract.MEAN_RGB)) / np.array(contract.STDDEV_RGB)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, data_dir, **kw):
  # An untyped copy: these tests set `shapes_image_size` to a (min, max)
  # pair, which the typed (int) placeholder of the config refuses.
  cfg = ml_collections.ConfigDict(config_common.data_config(name).to_dict())
  cfg.data_dir = str(data_dir)
  cfg.image_size = SIZE
  cfg.update(kw)
  return cfg


@pytest.fixture(scope='module')
def det_cfg(tmp_path_factory):
  """32 train / 11 validation images of 96..160 px (non-square)."""
  return _config('shapes/detection', tmp_path_factory.mktemp('tfds'),
                 num_train_examples=32, num_eval_examples=11,
                 shapes_image_size=(96, 160), aug_scale_min=0.5,
                 aug_scale_max=2.0, shuffle_buffer=32, max_instances=12)


@pytest.fixture(scope='module')
def cls_cfg(tmp_path_factory):
  return _config('shapes/classification', tmp_path_factory.mktemp('tfds'),
                 num_train_examples=16, num_eval_examples=7,
                 shapes_image_size=(128, 160), shuffle_buffer=16)


def _shapes_config(cfg):
  return common._shapes_config(cfg)  # pylint: disable=protected-access


def _take(it, n):
  return [next(it) for _ in range(n)]


def _unnormalize(image):
  return (image * np.array(contract.STDDEV_RGB) + contract.MEAN_RGB) * 255


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _jpeg(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


# ----------------------------------------------------------------- detection


def test_default_config():
  cfg = config_common.data_config('coco/2017')
  assert cfg.image_size == 640 and cfg.max_instances == 100
  assert (cfg.aug_scale_min, cfg.aug_scale_max) == (0.1, 2.0)
  assert config_common.data_config('imagenet2012').image_size == 224
  assert config_common.data_config().name == 'shapes/detection'


def test_contract_imports_no_tensorflow():
  code = ("import input_pipeline.contract, sys; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow'; "
          "assert 'numpy' not in sys.modules, 'numpy'")
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_contract_label_maps():
  assert contract.label_map('shapes/detection', True, 0) == shapes.LABEL_MAP
  assert shapes.LABEL_MAP == {1: 'circle', 2: 'square', 3: 'triangle'}
  assert contract.label_map('shapes/classification', False, 0) == {
      0: 'circle', 1: 'square', 2: 'triangle'}
  assert contract.label_map('shapes/classification', False, 1)[3] == (
      'triangle')
  coco = contract.label_map('coco/2017', True, 0)
  assert coco == contract.COCO_LABEL_MAP
  assert coco is not contract.COCO_LABEL_MAP  # A copy, free to change.
  assert len(coco) == 80 and coco[1] == 'person' and coco[90] == 'toothbrush'
  assert contract.COCO_CATEGORY_IDS == tuple(sorted(coco))
  assert contract.label_map('coco/2017', False, 0) == {}
  assert contract.label_map('imagenet2012', False, 1) == {}


def test_scale_and_crop_matches_resize_then_slice():
  image = tf.constant(np.random.default_rng(0).integers(
      0, 256, (30, 40, 3)), tf.uint8)
  full = tf.image.resize(tf.cast(image, tf.float32), [60, 80]).numpy()
  out = common.scale_and_crop(image, tf.constant([20, 25]),
                              tf.constant([2.0, 2.0]),
                              tf.constant([7.0, 11.0])).numpy()
  np.testing.assert_allclose(out, full[7:27, 11:36], atol=1e-3)


def test_detection_train_batch(det_cfg):
  assert common.num_examples(det_cfg, 'train') == 32
  it = detection.train_iterator(det_cfg, batch_size=8, seed=0)
  for batch in _take(it, 2):
    assert set(batch) == {'image', 'boxes', 'classes', 'is_crowd'}
    assert batch['image'].shape == (8, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert (batch['image'] >= LO.min() - 1e-5).all()
    assert (batch['image'] <= HI.max() + 1e-5).all()
    assert batch['boxes'].shape == (8, 12, 4)
    assert batch['boxes'].dtype == np.float32
    assert batch['classes'].shape == (8, 12)
    assert batch['classes'].dtype == np.int32
    assert batch['is_crowd'].shape == (8, 12) and not batch['is_crowd'].any()
    valid = batch['classes'] >= 0
    assert set(np.unique(batch['classes'][valid])) <= {1, 2, 3}
    assert valid.any(axis=1).sum() >= 4  # Most images keep an object.
    assert (batch['classes'][~valid] == -1).all()
    assert (batch['boxes'][~valid] == -1).all()
    boxes = batch['boxes'][valid]
    assert (boxes >= 0).all() and (boxes <= SIZE).all()
    assert (boxes[:, 2] > boxes[:, 0]).all()
    assert (boxes[:, 3] > boxes[:, 1]).all()
    # Valid boxes first, then padding.
    assert (np.diff(valid.astype(int), axis=1) <= 0).all()


def _through_pipeline(preprocess, image, bbox, **kw):
  """Runs a one-object example with `image` (PNG) through `preprocess`."""
  ex = {'image': tf.constant(_png(image)),
        'objects': {'bbox': tf.constant(bbox, tf.float32)[None],
                    'label': tf.constant([0], tf.int64),
                    'is_crowd': tf.constant([False])}}
  return {k: v.numpy() for k, v in preprocess(ex, **kw).items()}


def _check_mask_in_box(image, box, tol):
  """The object's pixels lie inside `box`, and `box` is tight.

  `image` is a network input made from a white-on-black object mask.
  Inside: pixels covered more than half by the object (bilinear) have their
  centres in the box. Tight (only for objects not clipped by the crop, whose
  boxes are then those of the whole shape): pixels touched at all by the
  object reach to within `tol` px of each side (thin tips fade below half).

  Returns:
    Whether tightness was checked.
  """
  valid = (image != 0).any(-1)  # Padding is exactly 0 after normalising.
  pixels = _unnormalize(image)[..., 0]
  ys, xs = np.nonzero((pixels > 127.5) & valid)
  if box is None:
    assert ys.size == 0
    return False
  y0, x0, y1, x1 = box
  assert (ys + 0.5 >= y0 - 1e-3).all() and (ys + 0.5 <= y1 + 1e-3).all()
  assert (xs + 0.5 >= x0 - 1e-3).all() and (xs + 0.5 <= x1 + 1e-3).all()
  height, width = valid.any(1).sum(), valid.any(0).sum()
  if min(y0, x0) <= 0 or y1 >= height or x1 >= width:
    return False
  ys, xs = np.nonzero((pixels > 1) & valid)
  assert ys.min() - y0 <= tol and y1 - (ys.max() + 1) <= tol
  assert xs.min() - x0 <= tol and x1 - (xs.max() + 1) <= tol
  return True


def test_detection_train_boxes_follow_objects(det_cfg):
  """Each drawn object, sent alone through the same flip/jitter/crop as its
  image, lands inside its box in the batch, and the box is tight."""
  config = _shapes_config(det_cfg)
  it = detection.train_iterator(det_cfg, batch_size=8, seed=3,
                                with_ids=True)
  checked = tight = 0
  for step, batch in enumerate(_take(it, 2)):
    for r in range(8):
      key = common.example_key(3, 0, tf.constant(step * 8 + r, tf.int64))
      drawn = shapes.render(config, 'train', int(batch['image_id'][r]),
                            return_masks=True)
      h, w = drawn['image'].shape[:2]
      valid = batch['classes'][r] >= 0
      kept = 0
      for box, label, mask in zip(drawn['boxes'], drawn['labels'],
                                  drawn['masks']):
        out = _through_pipeline(
            detection.preprocess_train, np.repeat(mask[..., None] * 255, 3,
                                                  -1).astype(np.uint8),
            np.float32(box) / [h, w, h, w], key=key, size=SIZE,
            scale_min=0.5, scale_max=2.0, max_instances=1,
            class_fn=lambda l: l + 1)
        out_box = out['boxes'][0] if out['classes'][0] > 0 else None
        tight += _check_mask_in_box(out['image'], out_box, tol=2.5)
        if out_box is not None:  # Same box, same class as in the batch.
          np.testing.assert_allclose(batch['boxes'][r, kept], out_box,
                                     atol=1e-3)
          assert batch['classes'][r, kept] == label + 1
          kept += 1
          checked += 1
      assert kept == valid.sum()
  assert checked >= 20 and tight >= 10


def test_detection_train_deterministic_and_resumable(det_cfg):
  # 32 examples, local batch 8: an epoch is 4 steps; steps 3..5 cross it.
  full = _take(detection.train_iterator(det_cfg, batch_size=8, seed=7), 6)
  again = _take(detection.train_iterator(det_cfg, batch_size=8, seed=7), 6)
  resumed = _take(detection.train_iterator(det_cfg, batch_size=8, seed=7,
                                           start_step=3), 3)
  other = next(detection.train_iterator(det_cfg, batch_size=8, seed=8))
  for a, b in zip(full, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(full[0]['image'], other['image'])


def test_detection_eval_maps_back_to_original(det_cfg):
  config = _shapes_config(det_cfg)
  batches = list(detection.eval_iterator(det_cfg, batch_size=4))
  assert len(batches) == 3  # 11 examples -> 3 batches, 1 padded slot.
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == 11 and not masks[-1]
  for batch in batches:
    assert batch['image'].shape == (4, SIZE, SIZE, 3)
    assert batch['image_id'].dtype == np.int64
    assert batch['scale'].dtype == np.float32
    assert batch['orig_size'].dtype == np.int32
    assert batch['gt_boxes'].shape == (4, 12, 4)
    assert batch['gt_classes'].dtype == np.int32
    assert batch['mask'].dtype == bool
    for r in range(4):
      if not batch['mask'][r]:
        assert batch['image_id'][r] == -1
        assert (batch['gt_classes'][r] == -1).all()
        assert (batch['gt_boxes'][r] == -1).all()
        continue
      drawn = shapes.render(config, 'validation', int(batch['image_id'][r]),
                            return_masks=True)
      h, w = drawn['image'].shape[:2]
      n = len(drawn['boxes'])
      assert tuple(batch['orig_size'][r]) == (h, w)
      assert batch['scale'][r] == pytest.approx(SIZE / max(h, w))
      np.testing.assert_allclose(batch['gt_boxes'][r, :n], drawn['boxes'],
                                 atol=1e-3)
      np.testing.assert_array_equal(batch['gt_classes'][r, :n],
                                    drawn['labels'] + 1)
      assert (batch['gt_classes'][r, n:] == -1).all()
      # Padding right/bottom of the resized image is zero.
      rh, rw = round(h * batch['scale'][r]), round(w * batch['scale'][r])
      assert (batch['image'][r, rh:] == 0).all()
      assert (batch['image'][r, :, rw:] == 0).all()
      # Objects appear at gt_box * scale in the network input.
      for box, mask in zip(drawn['boxes'], drawn['masks']):
        out = _through_pipeline(
            lambda ex, **kw: detection.preprocess_eval(
                ex, tf.constant(0, tf.int64), **kw),
            np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8),
            np.float32(box) / [h, w, h, w], size=SIZE, max_instances=1,
            class_fn=lambda l: l + 1)
        net_box = out['gt_boxes'][0] * batch['scale'][r]
        assert _check_mask_in_box(out['image'], net_box, tol=1.5)
        np.testing.assert_allclose(net_box / batch['scale'][r], box,
                                   atol=1e-3)


def test_two_processes_disjoint_and_covering(det_cfg):
  # Evaluation: 11 examples over 2 processes (6 + 5), local batch 2.
  streams = [list(detection.eval_iterator(det_cfg, batch_size=4,
                                          process_index=p, process_count=2))
             for p in (0, 1)]
  assert len(streams[0]) == len(streams[1]) == 3
  ids = [np.concatenate([b['image_id'][b['mask']] for b in s])
         for s in streams]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(np.concatenate(ids)) == list(range(11))
  assert all(b['image'].shape[0] == 2 for s in streams for b in s)
  # Training: 32 examples, 16 per process, local batch 4: 4 steps an epoch.
  train = [np.concatenate([
      b['image_id'] for b in _take(detection.train_iterator(
          det_cfg, batch_size=8, seed=0, process_index=p, process_count=2,
          with_ids=True), 8)]) for p in (0, 1)]
  for p in (0, 1):
    assert len(set(train[p][:16])) == 16  # An epoch has no repeats.
    assert set(train[p][:16]) == set(train[p][16:])  # Same slice each epoch.
    assert not np.array_equal(train[p][:16], train[p][16:])  # Reshuffled.
  assert not set(train[0]) & set(train[1])
  assert sorted(set(train[0]) | set(train[1])) == list(range(32))


def test_errors(det_cfg, tmp_path):
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    detection.train_iterator(det_cfg, batch_size=8, seed=0, process_index=0,
                             process_count=3)
  with pytest.raises(ValueError, match='process_index 2'):
    detection.eval_iterator(det_cfg, batch_size=4, process_index=2,
                            process_count=2)
  bad = _config('no_such_dataset/v1', tmp_path)
  with pytest.raises(ValueError, match=r"'no_such_dataset/v1'.*" +
                     str(tmp_path)):
    detection.train_iterator(bad, batch_size=2, seed=0)
  missing = _config('coco/2017', tmp_path)
  with pytest.raises(FileNotFoundError,
                     match=r"'coco/2017.*not prepared.*" + str(tmp_path)):
    detection.train_iterator(missing, batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError, match='not prepared'):
    detection.eval_iterator(missing, batch_size=2)
  with pytest.raises(ValueError, match='COCO schema'):
    detection.train_iterator(
        _config('shapes/classification', tmp_path, num_train_examples=2,
                num_eval_examples=1), batch_size=2, seed=0)


# ------------------------------------------------------------ classification


def test_classification_pipelines(cls_cfg):
  config = _shapes_config(cls_cfg)
  batches = _take(classification.train_iterator(cls_cfg, batch_size=8,
                                                seed=0, with_ids=True), 4)
  for batch in batches:
    assert batch['image'].shape == (8, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert (batch['image'] >= LO.min() - 1e-5).all()
    assert (batch['image'] <= HI.max() + 1e-5).all()
    assert batch['label'].dtype == np.int32
    for image_id, label in zip(batch['image_id'], batch['label']):
      assert label == shapes.render(config, 'train', int(image_id))['labels'][0]
  resumed = next(classification.train_iterator(cls_cfg, batch_size=8,
                                               seed=0, start_step=3))
  np.testing.assert_array_equal(resumed['image'], batches[3]['image'])

  cls_cfg = cls_cfg.copy_and_resolve_references()
  cls_cfg.label_offset = 1
  streams = [list(classification.eval_iterator(
      cls_cfg, batch_size=4, process_index=p, process_count=2))
             for p in (0, 1)]
  assert len(streams[0]) == len(streams[1]) == 2  # 4 + 3 examples.
  labels = np.concatenate([b['label'][b['mask']] for s in streams
                           for b in s])
  expected = [shapes.render(config, 'validation', i)['labels'][0] + 1
              for i in range(7)]
  np.testing.assert_array_equal(labels, expected)
  padded = np.concatenate([b['label'][~b['mask']] for s in streams
                           for b in s])
  assert list(padded) == [-1]


def test_center_crop_eval_geometry():
  # A 100x200 image whose left and right quarters are black: the central
  # crop (87.5 of 100 px) sees only the white middle.
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 50:150] = 255
  out = classification.preprocess_eval(
      {'image': tf.constant(_png(image)), 'label': tf.constant(2, tf.int64)},
      size=32)
  pixels = _unnormalize(out['image'].numpy())
  assert out['label'].numpy() == 2
  np.testing.assert_allclose(pixels, 255, atol=1e-3)


# --------------------------------------------------- mocked COCO and ImageNet


def _write_metadata(name, data_dir, splits):
  """Writes `dataset_info.json` as if `name` were prepared (no data)."""
  builder = tfds.builder(name, data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir, dataset_name=builder.name,
      filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                          filename_template=template)
      for s, n in splits.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def _coco_example(i):
  """A 120x160 image with a red box; labels 0, 11, 79; the last is crowd."""
  h, w = 120, 160
  image = np.full((h, w, 3), 90, np.uint8)
  image[30:90, 40:120] = (255, 0, 0)
  return {
      'image': _jpeg(image),
      'image/filename': f'{i}.jpg',
      'image/id': 1000 + i,
      'objects': {
          'id': np.arange(3, dtype=np.int64),
          'area': np.full(3, 100, np.int64),
          'bbox': np.float32([[30 / h, 40 / w, 90 / h, 120 / w],
                              [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]),
          'label': np.int64([0, 11, 79]),
          'is_crowd': np.array([False, False, True]),
      },
  }


def _mock_dataset(make_example, sizes):
  """A mocked `_as_dataset`: `sizes[split]` examples from `make_example`."""
  def as_dataset_fn(self, split, decoders=None, read_config=None,
                    shuffle_files=False, **kwargs):
    del self, read_config, shuffle_files, kwargs
    assert isinstance(decoders['image'], tfds.decode.SkipDecoding)
    name = getattr(split, 'split', split)  # `tfds.even_splits` part, if any.
    examples = [make_example(i) for i in range(sizes[name])]
    if name != split:
      per = -(-len(examples) // split.count)
      examples = examples[split.index * per:(split.index + 1) * per]
    return tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *x: np.stack(x), *examples))
  return as_dataset_fn


def test_coco_2017_mocked(tmp_path):
  sizes = {'train': 6, 'validation': 5}
  _write_metadata('coco/2017', str(tmp_path), sizes)
  cfg = _config('coco/2017', tmp_path, image_size=64, aug_scale_min=1.0,
                aug_scale_max=1.0)
  with tfds.testing.mock_data(as_dataset_fn=_mock_dataset(_coco_example, sizes),
                              data_dir=str(tmp_path)):
    batch = next(detection.train_iterator(cfg, batch_size=4, seed=0))
    # Crowd dropped in training; labels -> COCO category ids 1 and 13.
    np.testing.assert_array_equal(batch['classes'][:, :3],
                                  [[1, 13, -1]] * 4)
    assert batch['image'].shape == (4, 64, 64, 3)
    for r in range(4):  # Scale 1: long side 64 = 0.4 x 160, no crop.
      box = batch['boxes'][r, 0]
      np.testing.assert_allclose(sorted([box[1], 64 - box[3]]), [16, 16],
                                 atol=1e-3)
      np.testing.assert_allclose(box[[0, 2]], [12, 36], atol=1e-3)
    evals = list(detection.eval_iterator(
        _config('coco/2017', tmp_path, image_size=64), batch_size=4))
  assert len(evals) == 2
  np.testing.assert_array_equal(evals[0]['image_id'],
                                [1000, 1001, 1002, 1003])
  np.testing.assert_array_equal(evals[1]['mask'], [True, False, False,
                                                   False])
  np.testing.assert_array_equal(evals[0]['gt_classes'][:, :4],
                                [[1, 13, 90, -1]] * 4)
  np.testing.assert_array_equal(evals[0]['gt_is_crowd'][0, :3],
                                [False, False, True])
  np.testing.assert_allclose(evals[0]['gt_boxes'][0, 0], [30, 40, 90, 120],
                             atol=1e-3)
  np.testing.assert_allclose(evals[0]['scale'], 0.4)
  np.testing.assert_array_equal(evals[0]['orig_size'][0], [120, 160])
  assert len(contract.COCO_CATEGORY_IDS) == 80
  assert len(set(contract.COCO_CATEGORY_IDS)) == 80


def _imagenet_example(i):
  image = np.full((90 + i, 120, 3), 40 * (i % 6), np.uint8)
  encoded = b'not an image' if i == 3 else _jpeg(image)
  return {'image': encoded, 'label': np.int64(i * 100),
          'file_name': f'{i}.JPEG'}


def test_imagenet2012_mocked_and_undecodable_images_skipped(tmp_path):
  sizes = {'train': 8, 'validation': 8}
  _write_metadata('imagenet2012', str(tmp_path), sizes)
  cfg = _config('imagenet2012', tmp_path, image_size=32, label_offset=1,
                shuffle_buffer=1)
  with tfds.testing.mock_data(as_dataset_fn=_mock_dataset(
      _imagenet_example, sizes), data_dir=str(tmp_path)):
    it = classification.train_iterator(cfg, batch_size=7, seed=0)
    batch = next(it)
    assert it.num_skipped == 1  # Example 3 cannot be decoded.
    np.testing.assert_array_equal(batch['label'],
                                  [1, 101, 201, 401, 501, 601, 701])
    assert batch['image'].shape == (7, 32, 32, 3)
    ev = classification.eval_iterator(cfg, batch_size=4)
    batches = list(ev)
  assert ev.num_skipped == 1
  assert len(batches) == 2
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches]),
      [1, 101, 201, 401, 501, 601, 701, -1])
  np.testing.assert_array_equal(
      np.concatenate([b['mask'] for b in batches]), [True] * 7 + [False])
  # Grey levels survive the centre crop (uniform images).
  grey = _unnormalize(batches[0]['image'][1]).mean()
  assert grey == pytest.approx(40, abs=2)
