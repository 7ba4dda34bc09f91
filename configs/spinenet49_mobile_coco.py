"""SpineNet-Mobile-49 RetinaNet on COCO: Model Garden's recipe.

`coco_spinenet49_mobile_tpu.yaml`: batch 256, lr 0.32 x batch/256, 600 epochs
with x0.1 decays at epochs 570 and 590 (steps 263340 and 272580 of 277200),
2000 warmup steps from 0.0067, weight decay 3e-5, scale jitter 0.5..2.0,
stochastic depth 0.2, squeeze-excitation 0.2, hard-swish, separable head 4 x
48, bfloat16, input 384. For 49S use --config.model.model_id=49S_mobile; for
49XS also --config.model.activation=swish --config.data.image_size=256.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.coco_recipe('49_mobile', image_size=384)
  c.model.activation = 'hard_swish'
  c.model.se_ratio = 0.2
  c.data.aug_scale_min = 0.5
  c.num_epochs = 600
  c.optimizer.decay_at = (570 / 600, 590 / 600)
  c.optimizer.weight_decay = 3e-5
  return c
