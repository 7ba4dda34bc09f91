"""Classification input pipeline for TFDS datasets with `image` and `label`.

Training: Inception-style random crop (area 8%..100%, aspect 3/4..4/3, as
in Model Garden and the TF ResNet preprocessing; JPEGs are decoded only
inside the crop), resize to S x S, random horizontal flip, ImageNet
normalisation. Evaluation: central crop of 87.5% of the short side, resized
to S x S. Labels: TFDS label + `label_offset` (e.g. 1 for 1001-class
ImageNet checkpoints). Label smoothing is left to the loss.
"""
from __future__ import annotations

import functools

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import common

CENTER_CROP_FRACTION = 0.875
Features = common.Features


def _check_schema(builder: tfds.core.DatasetBuilder) -> None:
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(
        f'Dataset {builder.info.full_name!r} has no `image` and `label` '
        f'features; its features are {features}.')


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
  """[H, W] of an encoded image (JPEG: from the header only)."""
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.image.extract_jpeg_shape(encoded)[:2],
      lambda: tf.shape(common.decode_image(encoded))[:2])


def decode_and_crop(encoded: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Decodes the crop `window` = [y, x, h, w] of an image; uint8 [h, w, 3]."""
  def jpeg():
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = common.decode_image(encoded)
    return tf.slice(image, [window[0], window[1], 0],
                    [window[2], window[3], 3])

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def preprocess_train(ex: Features, key: tf.Tensor, *, size: int,
                     label_offset: int = 0) -> Features:
  """Inception crop, resize, flip, normalise."""
  k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = _image_shape(ex['image'])
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=k_crop,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = decode_and_crop(ex['image'], window)
  image = tf.image.resize(image, [size, size], 'bilinear')
  image = tf.cond(tf.random.stateless_uniform([], k_flip) < 0.5,
                  lambda: tf.reverse(image, [1]), lambda: image)
  return {'image': tf.ensure_shape(common.normalize(image),
                                   [size, size, 3]),
          'label': tf.cast(ex['label'], tf.int32) + label_offset}


def preprocess_eval(ex: Features, *, size: int, label_offset: int = 0
                    ) -> Features:
  """Central crop (87.5% of the short side), resize, normalise."""
  shape = _image_shape(ex['image'])
  crop = tf.cast(CENTER_CROP_FRACTION * tf.cast(tf.reduce_min(shape),
                                                tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  offset = (shape - crop + 1) // 2
  window = tf.stack([offset[0], offset[1], crop, crop])
  image = decode_and_crop(ex['image'], window)
  image = tf.image.resize(image, [size, size], 'bilinear')
  return {'image': tf.ensure_shape(common.normalize(image), [size, size, 3]),
          'label': tf.cast(ex['label'], tf.int32) + label_offset,
          'mask': tf.constant(True)}


def train_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                   seed: int, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None,
                   with_ids: bool = False) -> common.NumpyIterator:
  """Endless training batches of this process.

  Yields NumPy dicts: `image` float32 [b, S, S, 3], `label` int32 [b]; with
  `with_ids` also `image_id` int64 [b] (`image/id`, -1 if absent).
  b = batch_size // process_count. Deterministic in (seed, step,
  process_index, process_count), like `detection.train_iterator`.
  """
  pi, pc = common.resolve_process(process_index, process_count)
  b = common.local_batch_size(batch_size, pc)
  builder = common.get_builder(data_cfg)
  _check_schema(builder)
  preprocess = functools.partial(
      preprocess_train, size=data_cfg.image_size,
      label_offset=data_cfg.get('label_offset', 0))

  def fn(index, ex):
    out = preprocess(ex, common.example_key(seed, pi, index))
    if with_ids:
      out['image_id'] = tf.cast(ex.get('image/id', -1), tf.int64)
    return out

  ds = common.train_examples(
      builder, data_cfg.train_split, seed=seed, start_index=start_step * b,
      process_index=pi, process_count=pc,
      shuffle_buffer=data_cfg.shuffle_buffer)
  ds = common.finish(ds, fn, data_cfg, b)
  return common.NumpyIterator(ds, f'{data_cfg.name} train',
                              first_index=start_step * b)


def eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> common.NumpyIterator:
  """One pass over this process's slice of `eval_split`, padded with masks.

  Yields NumPy dicts: `image` float32 [b, S, S, 3], `label` int32 [b] (-1 for
  padding), `mask` bool [b]. Every process yields the same number of batches.
  """
  pi, pc = common.resolve_process(process_index, process_count)
  b = common.local_batch_size(batch_size, pc)
  builder = common.get_builder(data_cfg)
  _check_schema(builder)
  ds, _, size, largest = common.eval_examples(
      builder, data_cfg.eval_split, process_index=pi, process_count=pc)
  preprocess = functools.partial(
      preprocess_eval, size=data_cfg.image_size,
      label_offset=data_cfg.get('label_offset', 0))
  s = data_cfg.image_size
  pad = {'image': tf.zeros([s, s, 3]), 'label': tf.constant(-1, tf.int32),
         'mask': tf.constant(False)}
  ds = common.finish(ds, lambda i, ex: preprocess(ex), data_cfg, b, pad=pad,
                     num_batches=common.ceil_div(largest, b))
  return common.NumpyIterator(ds, f'{data_cfg.name} eval', total=size)
