"""A reduced-width SpineNet-49 classifier on the built-in shapes data."""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.classification_config('shapes/classification')
  c.model.num_classes = 3
  c.model.filter_size_scale = 0.25
  c.model.endpoints_num_filters = 64
  c.data.image_size = 128
  c.batch_size = 32
  c.total_steps = 300
  c.optimizer.base_learning_rate = 0.8  # peak 0.1 at batch 32
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 1e-4
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  return c
