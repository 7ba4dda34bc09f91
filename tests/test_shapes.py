"""The built-in synthetic shapes dataset: drawing and the TFDS builder."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import shapes


def test_render_is_deterministic_with_exact_boxes():
  cfg = shapes.make_config('detection')
  for index in range(20):
    ex = shapes.render(cfg, 'train', index, return_masks=True)
    again = shapes.render(cfg, 'train', index)
    np.testing.assert_array_equal(ex['image'], again['image'])
    assert ex['image'].shape == (256, 256, 3) and ex['image'].dtype == np.uint8
    assert 1 <= len(ex['boxes']) <= 8
    assert set(ex['labels']) <= {0, 1, 2}
    for mask, (y0, x0, y1, x1) in zip(ex['masks'], ex['boxes']):
      ys, xs = np.nonzero(mask)
      assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1,
                                                                  x1)
      assert 6 <= max(y1 - y0, x1 - x0) <= 129
  other = shapes.render(cfg, 'validation', 0)['image']
  assert not np.array_equal(other, shapes.render(cfg, 'train', 0)['image'])


def test_render_statistics():
  cfg = shapes.make_config('detection')
  labels, sizes, counts = [], [], []
  for index in range(100):
    ex = shapes.render(cfg, 'train', index)
    labels += list(ex['labels'])
    sizes += list(np.maximum(ex['boxes'][:, 2] - ex['boxes'][:, 0],
                             ex['boxes'][:, 3] - ex['boxes'][:, 1]))
    counts.append(len(ex['labels']))
  assert set(labels) == {0, 1, 2}
  assert min(counts) == 1 and max(counts) == 8
  assert min(sizes) < 20 and max(sizes) > 110
  # Textured background: no large flat areas.
  image = shapes.render(cfg, 'train', 0)['image'].astype(np.float32)
  assert image.std() > 20


def test_classification_render():
  cfg = shapes.make_config('classification')
  ex = shapes.render(cfg, 'train', 3)
  assert len(ex['labels']) == 1 and ex['labels'][0] in (0, 1, 2)
  size = ex['boxes'][0, 2:] - ex['boxes'][0, :2]
  assert size.max() >= 30


def test_make_config():
  assert shapes.make_config('detection') is shapes.Shapes.builder_configs[
      'detection']
  custom = shapes.make_config('detection', num_train=8, num_validation=4,
                              image_size=(128, 160))
  assert custom.name == 'detection_n8-4_px128-160_obj8-128x8_seed0'
  with pytest.raises(ValueError, match='segmentation'):
    shapes.make_config('segmentation')
  with pytest.raises(ValueError, match='image_size'):
    shapes.make_config('detection', image_size=(200, 100))
  with pytest.raises(ValueError, match='colour'):
    shapes.make_config('detection', colour=3)


def test_builder_builds_into_data_dir(tmp_path):
  config = shapes.make_config('detection', num_train=6, num_validation=3,
                              image_size=(128, 160))
  builder = shapes.Shapes(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert 'shapes' in tfds.list_builders()
  assert str(builder.data_dir).startswith(str(tmp_path))
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.splits['validation'].num_examples == 3
  examples = list(builder.as_dataset(split='validation').as_numpy_iterator())
  for i, ex in enumerate(examples):
    drawn = shapes.render(config, 'validation', i)
    h, w = drawn['image'].shape[:2]
    assert ex['image/id'] == i and ex['image'].shape == (h, w, 3)
    np.testing.assert_allclose(ex['objects']['bbox'] * [h, w, h, w],
                               drawn['boxes'], atol=1e-3)
    np.testing.assert_array_equal(ex['objects']['label'], drawn['labels'])
    assert not ex['objects']['is_crowd'].any()
    # JPEG at quality 90 stays close to the drawn pixels.
    err = np.abs(ex['image'].astype(int) - drawn['image'].astype(int))
    assert err.mean() < 10  # Mostly the lost pixel noise.
