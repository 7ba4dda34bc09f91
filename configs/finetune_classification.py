"""Fine-tune the shapes classifier on your own image folders.

  python train.py --config=configs/shapes_classification.py \
      --workdir=runs/shapes_cls          # the classifier this starts from
  python train.py --config=configs/finetune_classification.py \
      --workdir=runs/mine_cls --config.data.train_images=ROOT/train \
      --config.data.eval_images=ROOT/val

Folders `ROOT/<class name>/<image>` (README, "Your own data"); the
backbone comes from `init_from` and the classifier head starts fresh for
your classes (`model.num_classes` None: from the data). 300 steps of batch
32 at 128 px, SGD with a peak learning rate of 0.05 after 30 warmup steps.
"""

import ml_collections
from ml_collections import config_dict

from configs import shapes_classification


def get_config() -> ml_collections.ConfigDict:
  c = shapes_classification.get_config()
  c.data.name = 'image_folder'
  c.data.shuffle_buffer = 2000
  c.model.num_classes = config_dict.placeholder(int)  # None: from the data
  c.init_from = 'runs/shapes_cls'
  c.init_from_parts = 'backbone'
  c.optimizer.base_learning_rate = 0.4  # peak 0.05 at batch 32
  return c
