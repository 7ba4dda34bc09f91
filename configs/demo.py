"""Demo: a reduced-width SpineNet-49 RetinaNet on the built-in shapes data.

SpineNet-49's scale permutation at a quarter of its widths (and a 16-channel
stem), 256x256 inputs, trained from scratch in about 11.5 minutes on 2 CPU
cores: 2100 steps of batch 4 at about 12.5 images/s. From a fresh clone
`make demo` took 12 min 44 s and measured COCO AP 0.579 / AP50 0.830 on the
500 validation images (README, "The demo").

Choices for a short run on this data, each measured against the previous
ones (README, "The demo"):
- AdamW instead of SGD: AP 0.15 vs 0.04 after 300 steps of batch 8.
- Scale jitter 0.75..1.0 with no cropping: the shapes are never cut off in
  the data, and cut-off large shapes were being confused with other classes.
- Anchors 2x the stride (16..203 px over P3..P6) for the 8..128 px objects,
  and only square anchors: every object's box is close to square.
- Batch norm momentum 0.9, so that the running statistics used for
  evaluation follow the fast-changing weights.
- Decoupled weight decay on the conv kernels: at 0.05, the same AP50 on
  the seed that already did well and +0.045 / +0.059 on the other two
  (0.818 / 0.846 / 0.818). With batch norm's gradient written out on CPU
  the float rounding changed and seed 0 fell to AP50 0.789; at 0.1, seeds
  0 / 1 / 2 give AP50 0.836 / 0.805 / 0.833 (mean AP 0.572). The margin
  over 0.80 is smaller than what rounding moves (README, "The demo").
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.detection_config('shapes/detection')
  c.model.model_id = '49'
  c.model.num_classes = 4  # background + circle, square, triangle
  c.model.filter_size_scale = 0.25
  c.model.endpoints_num_filters = 64
  c.model.stem_filters = 16
  c.model.head_num_convs = 2
  c.model.head_num_filters = 64
  c.model.anchor_size = 2.0
  c.model.aspect_ratios = (1.0,)
  c.model.stochastic_depth_rate = 0.0
  c.model.bn_momentum = 0.9
  c.data.image_size = 256
  c.data.aug_scale_min = 0.75
  c.data.aug_scale_max = 1.0
  c.data.max_instances = 16  # At most 8 objects per image.
  c.batch_size = 4
  c.total_steps = 2100
  c.optimizer.name = 'adamw'
  c.optimizer.base_learning_rate = 0.224  # peak 3.5e-3 at batch 4
  c.optimizer.warmup_steps = 100
  c.optimizer.warmup_learning_rate = 0.0
  c.optimizer.schedule = 'cosine'
  c.optimizer.weight_decay = 0.1  # times the learning rate, kernels only
  c.optimizer.grad_clip_norm = 10.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500  # Evaluation only at the end.
  c.eval.pre_nms_top_k = 1000
  return c
