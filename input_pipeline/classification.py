"""Classification input pipeline for TFDS datasets with `image` and `label`.

Training: Inception-style random crop with the parameters of Model
Garden's `official/vision/ops/preprocess_ops.py` `random_crop_image_v2`
(area 8%..100%, aspect 3/4..4/3, min_object_covered 0.1, 10 attempts, else
the whole image, where Model Garden's parser takes the central crop; JPEGs
are decoded only inside the crop), resize to S x S, random horizontal flip,
ImageNet normalisation. Evaluation: central square crop of
`contract.CENTER_CROP_FRACTION` (87.5%, the fraction of Model Garden's
`center_crop_image_v2`) of the short side, resized to S x S. Labels: TFDS
label + `label_offset` (e.g. 1 for 1001-class ImageNet checkpoints). Label
smoothing is left to the loss. Malformed images are skipped or converted,
and counted, as `sanitize` describes.
"""
from __future__ import annotations

import functools

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import common
from input_pipeline import contract
from input_pipeline import sanitize

Features = common.Features


def _check_schema(builder: tfds.core.DatasetBuilder) -> None:
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(
        f'Dataset {builder.info.full_name!r} has no `image` and `label` '
        f'features; its features are {features}.')


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
  """[H, W] of an encoded image (JPEG and PNG: from the header only)."""
  def png():
    return tf.cast(sanitize.header_info(encoded)[:2], tf.int32)

  def other():
    return tf.shape(common.decode_image(encoded))[:2]

  is_png = tf.equal(tf.strings.substr(encoded, 0, 4), b'\x89PNG')
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.image.extract_jpeg_shape(encoded)[:2],
      lambda: tf.cond(is_png, png, other))


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
                     label_offset: int = 0,
                     max_pixels: int = sanitize.MAX_IMAGE_PIXELS) -> Features:
  """Inception crop, resize, flip, normalise."""
  k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  encoded, problems, ok = sanitize.check_image(ex['image'], max_pixels)
  shape = _image_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=k_crop,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = decode_and_crop(encoded, window)
  image = tf.image.resize(image, [size, size], 'bilinear')
  image = tf.cond(tf.random.stateless_uniform([], k_flip) < 0.5,
                  lambda: tf.reverse(image, [1]), lambda: image)
  return {'image': tf.ensure_shape(common.normalize(image),
                                   [size, size, 3]),
          'label': tf.cast(ex['label'], tf.int32) + label_offset,
          **sanitize.outputs(ok, problems)}


def preprocess_eval(ex: Features, *, size: int, label_offset: int = 0,
                    max_pixels: int = sanitize.MAX_IMAGE_PIXELS) -> Features:
  """Central crop (87.5% of the short side), resize, normalise."""
  encoded, problems, ok = sanitize.check_image(ex['image'], max_pixels)
  shape = _image_shape(encoded)
  crop = tf.cast(contract.CENTER_CROP_FRACTION * tf.cast(
      tf.reduce_min(shape), tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  offset = (shape - crop + 1) // 2
  window = tf.stack([offset[0], offset[1], crop, crop])
  image = decode_and_crop(encoded, window)
  image = tf.image.resize(image, [size, size], 'bilinear')
  return {'image': tf.ensure_shape(common.normalize(image), [size, size, 3]),
          'label': tf.cast(ex['label'], tf.int32) + label_offset,
          'mask': tf.constant(True), **sanitize.outputs(ok, problems)}


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
  def make_preprocess(builder: tfds.core.DatasetBuilder
                      ) -> common.Preprocess:
    _check_schema(builder)
    return functools.partial(preprocess_train, size=data_cfg.image_size,
                             label_offset=data_cfg.label_offset,
                             max_pixels=sanitize.max_image_pixels(data_cfg))

  return common.build_train_iterator(
      data_cfg, make_preprocess, batch_size=batch_size, seed=seed,
      start_step=start_step, process_index=process_index,
      process_count=process_count, with_ids=with_ids)


def eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> common.NumpyIterator:
  """One pass over this process's slice of `eval_split`, padded with masks.

  Yields NumPy dicts: `image` float32 [b, S, S, 3], `label` int32 [b] (-1 for
  padding), `mask` bool [b]. Every process yields the same number of batches.
  """
  def make_preprocess(builder: tfds.core.DatasetBuilder
                      ) -> common.Preprocess:
    _check_schema(builder)
    preprocess = functools.partial(
        preprocess_eval, size=data_cfg.image_size,
        label_offset=data_cfg.label_offset,
        max_pixels=sanitize.max_image_pixels(data_cfg))
    return lambda ex, index: preprocess(ex)

  s = data_cfg.image_size
  padding = {'image': tf.zeros([s, s, 3]), 'label': tf.constant(-1, tf.int32),
             'mask': tf.constant(False)}
  return common.build_eval_iterator(
      data_cfg, make_preprocess, padding, batch_size=batch_size,
      process_index=process_index, process_count=process_count)
