"""Shared defaults of the configs: the structure every config fills in."""

import ml_collections
from ml_collections import config_dict

from input_pipeline import common as data_common

# Types of the data fields that default to None, so that they can still be
# set from the command line (--config.data.data_dir=...).
_NONE_TYPES = {'data_dir': str, 'num_train_examples': int,
               'num_eval_examples': int, 'shapes_image_size': int}


def data_config(dataset: str) -> ml_collections.ConfigDict:
  data = data_common.default_data_config(dataset)
  for key, value in data.items():
    if value is None:
      data[key] = config_dict.placeholder(_NONE_TYPES.get(key, object))
  return data


def base_config(task: str, dataset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task  # 'retinanet' or 'classification'
  c.seed = 0
  c.dtype = 'float32'  # compute dtype; params stay float32
  c.model = ml_collections.ConfigDict(dict(
      model_id='49', activation='swish', stochastic_depth_rate=0.0,
      bn_momentum=0.99, bn_epsilon=1e-3,
      # None: from the model id's scaling map; typed so that they can be set
      # from the command line (--config.model.filter_size_scale=0.25).
      endpoints_num_filters=config_dict.placeholder(int),
      filter_size_scale=config_dict.placeholder(float),
      resample_alpha=config_dict.placeholder(float),
      block_repeats=config_dict.placeholder(int),
      stem_filters=config_dict.placeholder(int)))  # None: 64 (not mobile)
  c.data = data_config(dataset)
  c.batch_size = 256  # global
  c.total_steps = 0  # 0: from num_epochs
  c.num_epochs = 0
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: only at the end
  c.eval_batch_size = 0  # 0: batch_size
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',  # 'sgd' (with momentum) or 'adamw'
      base_learning_rate=0.32,  # peak = base * batch_size / 256
      momentum=0.9, schedule='step', warmup_steps=2000,
      warmup_learning_rate=0.0067, decay_at=(), decay_factor=0.1,
      weight_decay=4e-5, grad_clip_norm=0.0, ema_decay=0.0))
  c.loss = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return c


def detection_config(dataset: str = 'coco/2017') -> ml_collections.ConfigDict:
  c = base_config('retinanet', dataset)
  c.model.num_classes = 91
  c.model.num_scales = 3
  c.model.aspect_ratios = (0.5, 1.0, 2.0)
  c.model.anchor_size = config_dict.placeholder(float)
  c.model.head_num_convs = config_dict.placeholder(int)
  c.model.head_num_filters = config_dict.placeholder(int)
  c.model.head_use_separable_conv = config_dict.placeholder(bool)
  c.loss = ml_collections.ConfigDict(dict(
      box_loss_weight=50.0, focal_alpha=0.25, focal_gamma=1.5,
      huber_delta=0.1))
  c.eval = ml_collections.ConfigDict(dict(
      pre_nms_top_k=5000, score_threshold=0.05, iou_threshold=0.5,
      max_detections=100))
  return c


def coco_recipe(model_id: str, image_size: int) -> ml_collections.ConfigDict:
  """Model Garden's SpineNet RetinaNet COCO recipe (reference section 8.2)."""
  c = detection_config('coco/2017')
  c.model.model_id = model_id
  c.model.stochastic_depth_rate = 0.2
  c.model.activation = 'swish'
  c.data.image_size = image_size
  c.data.aug_scale_min = 0.1
  c.data.aug_scale_max = 2.0
  c.dtype = 'bfloat16'
  c.batch_size = 256
  c.num_epochs = 500
  c.optimizer.decay_at = (475 / 500, 490 / 500)
  c.eval_every_steps = 462 * 25
  c.checkpoint_every_steps = 462 * 5
  return c


def classification_config(dataset: str) -> ml_collections.ConfigDict:
  c = base_config('classification', dataset)
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_learning_rate = 0.0
  return c
