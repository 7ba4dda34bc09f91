"""Demo: a reduced-width SpineNet-49 RetinaNet on the built-in shapes data.

Same scale permutation as SpineNet-49, a quarter of its widths, 256x256
inputs. On an idle 2-core CPU a step of batch 16 takes about 2 s, so the 400
steps take about 13 minutes plus set-up, dataset drawing (35 s) and
compilation. This budget does not yet reach the COCO AP 0.40 target (AP was
0.02 after 250 steps in a slower, contended run); see issue notes.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.detection_config('shapes/detection')
  c.model.model_id = '49'
  c.model.num_classes = 4  # background + circle, square, triangle
  c.model.filter_size_scale = 0.25
  c.model.endpoints_num_filters = 64
  c.model.head_num_convs = 2
  c.model.head_num_filters = 64
  c.model.anchor_size = 3.0
  c.model.stochastic_depth_rate = 0.0
  c.data.image_size = 256
  c.data.aug_scale_min = 0.8
  c.data.aug_scale_max = 1.25
  c.batch_size = 16
  c.total_steps = 400
  c.optimizer.base_learning_rate = 0.64  # peak 0.04 at batch 16
  c.optimizer.warmup_steps = 50
  c.optimizer.warmup_learning_rate = 0.0
  c.optimizer.schedule = 'cosine'
  c.optimizer.weight_decay = 4e-5
  c.optimizer.grad_clip_norm = 10.0
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 100
  c.eval.pre_nms_top_k = 1000
  return c
