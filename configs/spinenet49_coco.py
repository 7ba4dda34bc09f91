"""SpineNet-49 RetinaNet on COCO: Model Garden's recipe.

Batch 256, lr 0.32 x batch/256, 500 epochs with x0.1 decays at epochs 475 and
490, 2000 warmup steps from 0.0067, weight decay 4e-5, scale jitter 0.1..2.0,
stochastic depth 0.2, swish, bfloat16, input 640.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.coco_recipe('49', image_size=640)
  return c
