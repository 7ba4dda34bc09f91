"""SpineNet-49 on ImageNet: the TPU classification recipe.

`tensorflow/tpu` `models/official/detection/configs/spinenet/
spinenet49_classification.yaml`: input 224, 1001 classes (label + 1, 0
unused as in the TPU models), batch 4096, 200 epochs of cosine decay from 1.6
with 5 warmup epochs (1564 steps), weight decay 1e-4, label smoothing 0.1,
batch norm momentum 0.9 and epsilon 1e-5, swish, stochastic depth 0.2.
Evaluation every 20 epochs and a checkpoint about every 3, at any batch size.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.classification_config('imagenet2012')
  c.model.model_id = '49'
  c.model.num_classes = 1001
  c.model.stochastic_depth_rate = 0.2
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.data.image_size = 224
  c.data.label_offset = 1
  c.dtype = 'bfloat16'
  c.batch_size = 4096
  c.num_epochs = 200  # 62400 steps at batch 4096 (the TPU recipe: 62557)
  c.optimizer.base_learning_rate = 0.1  # peak 1.6 at batch 4096
  c.optimizer.warmup_steps = 1564
  c.optimizer.weight_decay = 1e-4
  c.loss.label_smoothing = 0.1
  c.eval_every_epochs = 20
  c.checkpoint_every_epochs = 3
  return c
