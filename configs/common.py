"""Shared defaults of the configs: the structure every config fills in."""

import ml_collections
from ml_collections import config_dict

# TFDS names of the classification datasets the defaults know (any other
# name gets the detection defaults).
CLASSIFICATION_DATASETS = ('imagenet2012', 'imagenette', 'imagenet_v2',
                           'cifar10', 'cifar100', 'mnist', 'oxford_flowers102',
                           'image_folder')


def is_shapes(name: str) -> bool:
  """True for the built-in synthetic datasets ('shapes/detection', ...)."""
  return name == 'shapes' or name.startswith('shapes/')


def is_classification_dataset(name: str) -> bool:
  return (name == 'shapes/classification' or
          name.split('/')[0] in CLASSIFICATION_DATASETS)


def data_config(name: str = 'shapes/detection') -> ml_collections.ConfigDict:
  """`config.data` with the defaults for dataset `name` (a TFDS name).

  Known names get tuned defaults ('shapes/detection', 'shapes/classification',
  'coco/2017', 'imagenet2012'); any other TFDS name gets generic ones. None
  means unset (typed, so that it can be set from the command line).
  """
  detection = not is_classification_dataset(name)
  cfg = ml_collections.ConfigDict(dict(
      name=name,
      data_dir=config_dict.placeholder(str),  # None: ~/tensorflow_datasets.
      train_split='train',
      eval_split='validation',
      image_size=640 if detection else 224,
      aug_scale_min=0.1,  # Detection scale jitter (Model Garden default).
      aug_scale_max=2.0,
      max_instances=100,
      skip_crowd_during_training=True,
      label_offset=0,  # Classification: label = TFDS label + label_offset.
      shuffle_buffer=10_000,
      num_parallel_calls=-1,  # -1: tf.data.AUTOTUNE.
      prefetch=2,  # Batches prefetched by tf.data.
      # shapes/* only: dataset size and generated image size; None means the
      # registered default (4000 / 500 examples, 256 px).
      num_train_examples=config_dict.placeholder(int),
      num_eval_examples=config_dict.placeholder(int),
      shapes_image_size=config_dict.placeholder(int),
      # Your own data (name 'coco_json', 'voc_xml', 'od_tfrecord' or
      # 'image_folder'; input_pipeline/sources/, README "Your own data"):
      # annotations = COCO JSON file / VOC ImageSets/Main/<set>.txt /
      # TFRecord file pattern; images = COCO image folder / VOC JPEGImages
      # (optional) / <class>/<image> root. Eval ones unset: no validation
      # split (hold some out with train_split and eval_split 'train[..]').
      train_annotations=config_dict.placeholder(str),
      train_images=config_dict.placeholder(str),
      eval_annotations=config_dict.placeholder(str),
      eval_images=config_dict.placeholder(str),
      label_map=config_dict.placeholder(str),  # od_tfrecord: JSON or pbtxt.
  ))
  if is_shapes(name):
    cfg.image_size = 256 if detection else 224
    cfg.shuffle_buffer = 4000
  if name.startswith('imagenet'):
    cfg.shuffle_buffer = 16_384
  return cfg


def base_config(task: str, dataset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task  # 'retinanet' or 'classification'
  c.seed = 0
  c.dtype = 'float32'  # compute dtype; params stay float32
  c.model = ml_collections.ConfigDict(dict(
      model_id='49', activation='swish', stochastic_depth_rate=0.0,
      bn_momentum=0.99, bn_epsilon=1e-3,
      # How convolutions are lowered: 'auto' (on CPU: 1x1 gradients written
      # out, im2col matmuls for small feature maps, wide kernel gradients as
      # im2col matmuls, wide 3x3 convolutions of large maps as Winograd
      # matmuls), 'xla', 'im2col', 'im2col_grad' or 'winograd'
      # (spinenet_jax/conv_impl.py).
      conv_impl='auto',
      # How training-mode batch norm is differentiated: 'auto' (on CPU its
      # gradient written out, elsewhere JAX's), 'flax' or 'fused'
      # (spinenet_jax/norm_impl.py).
      norm_impl='auto',
      # Rematerialisation: 'none', 'blocks' (each block recomputed in the
      # backward pass: less memory, about a third more compute) or 'full'
      # (the stem, resampling and endpoints too); spinenet_jax/remat.py.
      remat='none',
      # None: from the model id's scaling map; typed so that they can be set
      # from the command line (--config.model.filter_size_scale=0.25).
      endpoints_num_filters=config_dict.placeholder(int),
      filter_size_scale=config_dict.placeholder(float),
      resample_alpha=config_dict.placeholder(float),
      block_repeats=config_dict.placeholder(int),
      stem_filters=config_dict.placeholder(int),  # None: 64 (not mobile)
      # None: the model id's permutation. Else (level, block_fn, (input,
      # input), is_output) per block, as in spinenet_jax/specs.py; from the
      # command line: --config.model.block_specs="((3, 'bottleneck', (0, 1),
      # True), ...)".
      block_specs=config_dict.placeholder(tuple)))
  c.data = data_config(dataset)
  c.batch_size = 256  # global
  # Durations: `*_steps`, or `*_epochs` converted at run time with the batch
  # size and the training split's size (`*_steps` wins when both are set).
  # None means unset; a cadence of 0 or None means never (but always at the
  # end of training and on SIGTERM).
  c.total_steps = config_dict.placeholder(int)
  c.num_epochs = config_dict.placeholder(float)
  c.log_every_steps = 100
  c.eval_every_steps = config_dict.placeholder(int)
  c.eval_every_epochs = config_dict.placeholder(float)
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
  c.checkpoint_every_steps = config_dict.placeholder(int)
  c.checkpoint_every_epochs = config_dict.placeholder(float)
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  # A NaN or infinite loss or gradient: 'stop' (keep the checkpoints, raise)
  # or 'rollback' (restore the last checkpoint, halve the learning rate and
  # continue, at most nan_max_rollbacks times); spinenet_jax/nonfinite.py.
  # Fine-tuning (spinenet_jax/finetune.py): a run directory whose variables
  # a fresh run starts from, and which: 'backbone' or 'backbone+head' (all
  # that matches in shape; e.g. the class predictor is re-initialised when
  # num_classes differs). Empty or None: from scratch.
  c.init_from = config_dict.placeholder(str)
  c.init_from_parts = 'backbone+head'
  c.nan_policy = 'stop'
  c.nan_max_rollbacks = 3
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',  # 'sgd' (with momentum) or 'adamw'
      base_learning_rate=0.32,  # peak = base * batch_size / 256
      schedule='step',  # 'step' or 'cosine'
      warmup_steps=config_dict.placeholder(int),  # None: no warmup
      warmup_learning_rate=0.0067, decay_at=(), decay_factor=0.1,
      weight_decay=4e-5,  # conv kernels only
      grad_clip_norm=config_dict.placeholder(float),  # None: no clipping
      ema_decay=config_dict.placeholder(float),  # None: no EMA of weights
      momentum=0.9, nesterov=False,  # sgd
      b1=0.9, b2=0.999, eps=1e-8))  # adamw
  c.loss = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict()
  # data: -1 = the devices not on 'model'; model > 1 partitions the image
  # height spatially; slices > 1 splits 'data' over the slices of a
  # multi-slice pod (gradients reduce over ICI, then DCN).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, slices=1))
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
      max_detections=100,
      # Validation images drawn to TensorBoard at each evaluation: ground
      # truth beside the predictions scoring at least draw_min_score.
      num_images_to_draw=4, draw_min_score=0.3))
  return c


def coco_recipe(model_id: str, image_size: int) -> ml_collections.ConfigDict:
  """Model Garden's SpineNet RetinaNet COCO recipe.

  `official/vision/configs/experiments/retinanet/coco_spinenet49_tpu.yaml`
  and its siblings: batch 256, 500 epochs, lr 0.32 x batch / 256 with 2000
  warmup steps from 0.0067 and x0.1 decays at epochs 475 and 490, weight
  decay 4e-5, scale jitter 0.1..2.0, stochastic depth 0.2, swish, bfloat16.
  Evaluation every 25 epochs and a checkpoint every 5, at any batch size.
  """
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
  c.optimizer.warmup_steps = 2000
  c.eval_every_epochs = 25
  c.checkpoint_every_epochs = 5
  return c


def classification_config(dataset: str) -> ml_collections.ConfigDict:
  c = base_config('classification', dataset)
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_learning_rate = 0.0
  return c
