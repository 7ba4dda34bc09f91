"""Scale-permuted architecture search on the built-in shapes data.

  python -m spinenet_jax.search --config=configs/search_shapes.py \
      --workdir=runs/search [--config.search.num_trials=30 ...]

`space` is the paper's R0-SP53 / SpineNet-49 search space (Du et al., CVPR
2020, section 3): 10 intermediate blocks on the levels {L2: 1, L3: 3, L4: 5,
L5: 1} of ResNet-50 (less its 2 stem blocks and one block per output level),
level deltas {-1, 0, +1, +2}, bottleneck or residual, parents among the last
5 features; 5 outputs L3..L7. `search` is regularized evolution (or random
search) with its trial storage; `trial` is the proxy training every
candidate gets: the paper's proxy widths (x0.25, resample alpha 0.25, a
64-channel head) at 256 px on the shapes data, scored by COCO AP on the last
300 images of the training split, which it does not train on.
"""

import ml_collections
from ml_collections import config_dict

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.space = ml_collections.ConfigDict(dict(
      intermediate_levels=(2, 3, 3, 3, 4, 4, 4, 4, 4, 5),
      output_levels=(3, 4, 5, 6, 7),
      level_deltas=(-1, 0, 1, 2),
      block_fns=('bottleneck', 'residual'),
      window=5,
      family='spinenet',
  ))
  c.search = ml_collections.ConfigDict(dict(
      algorithm='evolution',  # or 'random'
      num_trials=30,
      population_size=8,
      tournament_size=3,
      reject_dead=False,  # False: dead blocks are not built (Model Garden).
      seed=0,
      # Optuna storage URL; None: SQLite in the workdir. Use one PostgreSQL
      # (or MySQL) URL for workers on several hosts.
      storage=config_dict.placeholder(str),
      heartbeat_s=20,  # A worker silent for grace_s loses its trial to
      grace_s=60,      # another worker, which retrains it.
      max_retries=3,
      objective='proxy',  # 'toy': distance to SpineNet-49, no training.
      toy_seconds=0.0,    # 'toy' only: pretend each trial takes this long.
      metric='AP',
      target_macs=config_dict.placeholder(float),  # Reward AP * min(1,
      macs_weight=0.0,                             # target/MACs) ** weight.
      top_k=3,
  ))
  t = demo.get_config()
  t.model.resample_alpha = 0.25
  t.data.train_split = 'train[:3700]'
  t.data.eval_split = 'train[3700:]'  # Held out: 300 training images.
  t.total_steps = 600  # 2400 images, 0.65 epoch: about 4 min here.
  t.optimizer.warmup_steps = 50
  # The proxy's seed noise and rank correlation (README) were measured
  # without the demo's weight decay (added later); keep the proxy as measured.
  t.optimizer.weight_decay = 0.0
  t.log_every_steps = 100
  t.checkpoint_every_steps = 200
  t.keep_checkpoints = 1
  c.trial = t
  return c
