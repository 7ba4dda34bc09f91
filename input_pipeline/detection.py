"""Detection input pipeline (RetinaNet), for TFDS datasets in the COCO schema.

Schema: `image`, `objects/bbox` (normalised ymin, xmin, ymax, xmax),
`objects/label`, optional `objects/is_crowd` and `image/id`.

Training follows Model Garden's RetinaNet parser
(`official/vision/dataloaders/retinanet_input.py` `Parser._parse_train_data`
with the ops of `official/vision/ops/preprocess_ops.py`): decode, random
horizontal flip (`random_horizontal_flip`), scale jitter
`U[aug_scale_min, aug_scale_max]` of the output size with the aspect ratio
kept and a random crop of the output size (`resize_and_crop_image`,
`resize_and_crop_boxes`), ImageNet normalisation (`normalize_image`), zero
padding (bottom/right) to a square; boxes are mapped, clipped, emptied ones
dropped, and padded to `max_instances` with class -1 (crowd boxes are dropped
unless `skip_crowd_during_training` is False). Malformed images and boxes
are skipped, repaired or dropped, and counted, as `sanitize` describes.
Evaluation (`Parser._parse_eval_data`): long side resized to the output size
and padded; boxes stay in original pixels, with `scale` to map predictions back.

Class ids: `coco` (80 TFDS labels) -> COCO category ids 1..90 (the 91-slot
layout, `contract.COCO_CATEGORY_IDS`); any other dataset: TFDS label + 1.
0 is background everywhere.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import common
from input_pipeline import contract
from input_pipeline import sanitize

Features = common.Features


def class_mapper(builder: tfds.core.DatasetBuilder
                 ) -> Callable[[tf.Tensor], tf.Tensor]:
  """TFDS label -> class id (>= 1) for this dataset."""
  features = builder.info.features
  if ('objects' not in features or 'bbox' not in features['objects'] or
      'label' not in features['objects'] or 'image' not in features):
    raise ValueError(
        f'Dataset {builder.info.full_name!r} does not have the COCO schema '
        f'(image, objects/bbox, objects/label); its features are '
        f'{features}.')
  num = features['objects']['label'].num_classes
  if builder.name == 'coco' and num == len(contract.COCO_CATEGORY_IDS):
    table = tf.constant(contract.COCO_CATEGORY_IDS, tf.int32)
    return lambda label: tf.gather(table, label)
  return lambda label: label + 1


def _objects(ex: Features, class_fn, skip_crowd: bool
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Repaired normalised boxes [N, 4], class ids [N], is_crowd [N] and the
  problem vector of an example's boxes (`sanitize.clean_boxes`)."""
  obj = ex['objects']
  boxes = tf.reshape(tf.cast(obj['bbox'], tf.float32), [-1, 4])
  classes = class_fn(tf.cast(obj['label'], tf.int32))
  crowd = (tf.cast(obj['is_crowd'], tf.bool) if 'is_crowd' in obj
           else tf.zeros_like(classes, tf.bool))
  boxes, keep, problems = sanitize.clean_boxes(boxes)
  if skip_crowd:
    keep = tf.logical_and(keep, tf.logical_not(crowd))
  boxes, classes, crowd = (tf.boolean_mask(t, keep)
                           for t in (boxes, classes, crowd))
  return boxes, classes, crowd, problems


def _over_max(boxes: tf.Tensor, max_instances: int) -> tf.Tensor:
  return sanitize.flags(box_over_max_instances=tf.maximum(
      tf.shape(boxes)[0] - max_instances, 0))


def _pad_objects(boxes, classes, crowd, max_instances: int
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  return (common.pad_instances(boxes, max_instances, -1.0),
          common.pad_instances(classes, max_instances, -1),
          common.pad_instances(crowd, max_instances, False))


def jitter_and_crop(image: tf.Tensor, boxes: tf.Tensor, key: tf.Tensor, *,
                    size: int, scale_min: float, scale_max: float
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Random scale, crop and flip (Model Garden `resize_and_crop_image`).

  Args:
    image: uint8 [H, W, 3].
    boxes: [N, 4] normalised yxyx.
    key: stateless RNG key, [2] int64.
    size: output side S.
    scale_min: smallest scale of S the long side is resized to.
    scale_max: largest such scale.

  Returns:
    Float image [h, w, 3] with h, w <= S (unpadded, values 0..255) and boxes
    [N, 4] in its pixels, clipped (possibly empty).
  """
  k_scale, k_crop, k_flip = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  jitter = tf.random.stateless_uniform([], k_scale, scale_min, scale_max)
  target = tf.round(jitter * size)
  scale = tf.reduce_min(target / hw)
  new_hw = tf.maximum(tf.round(hw * scale), 1.0)
  max_offset = tf.maximum(new_hw - size, 0.0)
  offset = tf.floor(max_offset * tf.random.stateless_uniform([2], k_crop))
  out_hw = tf.minimum(new_hw - offset, size)
  # Resizing all and slicing is faster here than `common.scale_and_crop`.
  image = tf.image.resize(tf.cast(image, tf.float32),
                          tf.cast(new_hw, tf.int32), 'bilinear')
  offset_i, out_i = tf.cast(offset, tf.int32), tf.cast(out_hw, tf.int32)
  image = image[offset_i[0]:offset_i[0] + out_i[0],
                offset_i[1]:offset_i[1] + out_i[1]]
  factor = tf.tile(new_hw, [2])  # Normalised -> resized pixels.
  boxes = boxes * factor - tf.tile(offset, [2])
  boxes = tf.clip_by_value(boxes, 0.0, tf.tile(out_hw, [2]))
  flip = tf.random.stateless_uniform([], k_flip) < 0.5
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  flipped = tf.stack([ymin, out_hw[1] - xmax, ymax, out_hw[1] - xmin], -1)
  boxes = tf.where(flip, flipped, boxes)
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  return image, boxes


def preprocess_train(ex: Features, key: tf.Tensor, *, size: int,
                     scale_min: float, scale_max: float, max_instances: int,
                     class_fn, skip_crowd: bool = True,
                     max_pixels: int = sanitize.MAX_IMAGE_PIXELS) -> Features:
  """One training example -> fixed-shape features (see module docstring)."""
  encoded, image_problems, ok = sanitize.check_image(ex['image'], max_pixels)
  image = common.decode_image(encoded)
  boxes, classes, crowd, box_problems = _objects(ex, class_fn, skip_crowd)
  image, boxes = jitter_and_crop(image, boxes, key, size=size,
                                 scale_min=scale_min, scale_max=scale_max)
  image = tf.image.pad_to_bounding_box(common.normalize(image), 0, 0, size,
                                       size)
  keep = tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
  boxes, classes, crowd = (tf.boolean_mask(t, keep)
                           for t in (boxes, classes, crowd))
  over = _over_max(boxes, max_instances)
  boxes, classes, crowd = _pad_objects(boxes, classes, crowd, max_instances)
  return {'image': tf.ensure_shape(image, [size, size, 3]), 'boxes': boxes,
          'classes': classes, 'is_crowd': crowd,
          **sanitize.outputs(ok, image_problems, box_problems, over)}


def preprocess_eval(ex: Features, image_id: tf.Tensor, *, size: int,
                    max_instances: int, class_fn,
                    max_pixels: int = sanitize.MAX_IMAGE_PIXELS) -> Features:
  """Resize the long side to `size`, pad; ground truth in original pixels."""
  encoded, image_problems, ok = sanitize.check_image(ex['image'], max_pixels)
  image = common.decode_image(encoded)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.reduce_min(size / hw)
  new_hw = tf.clip_by_value(tf.round(hw * scale), 1.0, size)
  image = common.scale_and_crop(image, new_hw, tf.stack([scale, scale]))
  image = tf.image.pad_to_bounding_box(common.normalize(image), 0, 0, size,
                                       size)
  boxes, classes, crowd, box_problems = _objects(ex, class_fn,
                                                 skip_crowd=False)
  over = _over_max(boxes, max_instances)
  boxes, classes, crowd = _pad_objects(boxes * tf.tile(hw, [2]), classes,
                                       crowd, max_instances)
  if 'image/id' in ex:
    image_id = tf.cast(ex['image/id'], tf.int64)
  return {'image': tf.ensure_shape(image, [size, size, 3]),
          'image_id': image_id, 'scale': scale,
          'orig_size': tf.cast(hw, tf.int32), 'gt_boxes': boxes,
          'gt_classes': classes, 'gt_is_crowd': crowd,
          'mask': tf.constant(True),
          **sanitize.outputs(ok, image_problems, box_problems, over)}


def train_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                   seed: int, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None,
                   with_ids: bool = False) -> common.NumpyIterator:
  """Endless training batches of this process (its slice of the global batch).

  Yields NumPy dicts: `image` float32 [b, S, S, 3], `boxes` float32
  [b, M, 4] (yxyx, pixels of the S x S input, -1 padding), `classes` int32
  [b, M] (-1 padding), `is_crowd` bool [b, M]; with `with_ids` also
  `image_id` int64 [b]. b = batch_size // process_count, S =
  data_cfg.image_size, M = data_cfg.max_instances. The stream is a function
  of (seed, step, process_index, process_count): `start_step=K` yields steps
  K, K+1, ... of the uninterrupted stream (see `common`).
  """
  if not 0 < data_cfg.aug_scale_min <= data_cfg.aug_scale_max:
    raise ValueError(f'Need 0 < aug_scale_min <= aug_scale_max, got '
                     f'{data_cfg.aug_scale_min}, {data_cfg.aug_scale_max}.')

  def make_preprocess(builder: tfds.core.DatasetBuilder
                      ) -> common.Preprocess:
    return functools.partial(
        preprocess_train, size=data_cfg.image_size,
        scale_min=data_cfg.aug_scale_min, scale_max=data_cfg.aug_scale_max,
        max_instances=data_cfg.max_instances, class_fn=class_mapper(builder),
        skip_crowd=data_cfg.skip_crowd_during_training,
        max_pixels=sanitize.max_image_pixels(data_cfg))

  return common.build_train_iterator(
      data_cfg, make_preprocess, batch_size=batch_size, seed=seed,
      start_step=start_step, process_index=process_index,
      process_count=process_count, with_ids=with_ids)


def eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> common.NumpyIterator:
  """One pass over this process's slice of `eval_split`, padded with masks.

  Yields NumPy dicts: `image` float32 [b, S, S, 3], `image_id` int64 [b]
  (`image/id`, else the position in the split; -1 for padding), `scale`
  float32 [b] (input pixels per original pixel: original = box / scale),
  `orig_size` int32 [b, 2] (height, width), `gt_boxes` float32 [b, M, 4]
  (yxyx, original pixels), `gt_classes` int32 [b, M] (-1 padding),
  `gt_is_crowd` bool [b, M], `mask` bool [b] (False: padding). Every process
  yields the same number of batches.
  """
  def make_preprocess(builder: tfds.core.DatasetBuilder
                      ) -> common.Preprocess:
    return functools.partial(
        preprocess_eval, size=data_cfg.image_size,
        max_instances=data_cfg.max_instances, class_fn=class_mapper(builder),
        max_pixels=sanitize.max_image_pixels(data_cfg))

  return common.build_eval_iterator(
      data_cfg, make_preprocess, _eval_padding(data_cfg),
      batch_size=batch_size, process_index=process_index,
      process_count=process_count)


def _eval_padding(data_cfg: ml_collections.ConfigDict) -> Features:
  s, m = data_cfg.image_size, data_cfg.max_instances
  return {'image': tf.zeros([s, s, 3]), 'image_id': tf.constant(-1, tf.int64),
          'scale': tf.constant(1.0), 'orig_size': tf.zeros([2], tf.int32),
          'gt_boxes': -tf.ones([m, 4]), 'gt_classes': -tf.ones([m], tf.int32),
          'gt_is_crowd': tf.zeros([m], tf.bool), 'mask': tf.constant(False)}
