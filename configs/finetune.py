"""Fine-tune the demo detector on your own data (README, "Your own data").

  make demo    # runs/demo: the shapes detector this starts from
  python train.py --config=configs/finetune.py --workdir=runs/mine \
      --config.data.train_annotations=DATA/train.json \
      --config.data.train_images=DATA/train \
      --config.data.eval_annotations=DATA/val.json \
      --config.data.eval_images=DATA/val

The demo's model (configs/demo.py: SpineNet-49's permutation at a quarter
of its widths, 256 px) initialised from `runs/demo`: backbone and head
restored, the class predictor re-initialised for your classes
(`model.num_classes` None: taken from the data). A short schedule for a few
hundred images: 600 steps of batch 4 (about 4 minutes on 2 CPU cores),
AdamW with a peak learning rate of 1e-3 after 50 warmup steps, cosine decay,
evaluation at the end. `--config.init_from=` (empty) trains the same from
scratch; `--config.data.name=voc_xml|od_tfrecord` takes the other formats.
"""

import ml_collections
from ml_collections import config_dict

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.data.name = 'coco_json'
  c.data.shuffle_buffer = 1000
  c.data.max_instances = 32
  c.data.aug_scale_min = 0.75
  c.data.aug_scale_max = 1.25
  # None: from the data (its classes + background); typed, so that
  # --config.model.num_classes=N works too.
  c.model.num_classes = config_dict.placeholder(int)
  c.init_from = 'runs/demo'
  c.init_from_parts = 'backbone+head'
  c.total_steps = 600
  c.optimizer.base_learning_rate = 0.064  # peak 1e-3 at batch 4
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.0  # As measured (README); the demo's is 0.05.
  c.checkpoint_every_steps = 200
  c.log_every_steps = 50
  return c
