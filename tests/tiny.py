"""The tiny configurations the tests train, shared by conftest and modules.

Compilation, not checking, is what the tests spend their time on, so every
training test runs the smallest model that still exercises its behaviour:
SpineNet at 1/8 width with `TINY_SPECS`, a 5-block scale permutation (one
output per level 3..7, both block types, resampling up and down), 128-pixel
images and a one-conv head. The published permutations are checked in
test_models.py and test_spinenet_mobile.py.

Configs are loaded through the same flag parser as `train.py`, so every
override used here is one that works on the command line.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from absl import flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]

TINY_SPECS = ((3, 'bottleneck', (0, 1), True), (4, 'residual', (0, 2), True),
              (5, 'bottleneck', (2, 3), True), (7, 'residual', (3, 4), True),
              (6, 'bottleneck', (4, 5), True))
TINY_MOBILE_SPECS = tuple((l, 'mbconv', i, o) for l, _, i, o in TINY_SPECS)

TINY_DATA = {'data.num_train_examples': 64, 'data.num_eval_examples': 16,
             'data.shapes_image_size': 128, 'data.image_size': 128}
TINY_BACKBONE = {'model.filter_size_scale': 0.125,
                 'model.endpoints_num_filters': 16,
                 'model.block_specs': TINY_SPECS}
TINY_HEAD = {'model.head_num_convs': 1, 'model.head_num_filters': 16}
# The shared detection run (conftest `det_workdir`): 12 steps of batch 8 on
# the 8 test devices, SGD with peak learning rate 0.04 after 2 warmup steps,
# then cosine decay; EMA on, so that its path is covered. SGD, not the demo's
# AdamW: the exactness tests compare runs whose reductions add in different
# orders, and Adam's normalisation amplifies such rounding in near-zero
# gradients; the machinery under test does not depend on it.
TINY_DEMO = {**TINY_DATA, **TINY_BACKBONE, **TINY_HEAD,
             'batch_size': 8, 'total_steps': 12, 'optimizer.name': 'sgd',
             'optimizer.base_learning_rate': 1.28,
             'optimizer.warmup_steps': 2, 'optimizer.ema_decay': 0.9,
             'optimizer.weight_decay': 0.0,
             'log_every_steps': 1, 'checkpoint_every_steps': 4}
TINY_CLASSIFICATION_DATA = {**TINY_DATA, 'data.num_train_examples': 32}
# The shared classification run (conftest `cls_workdir`).
TINY_CLASSIFICATION = {**TINY_CLASSIFICATION_DATA, **TINY_BACKBONE,
                       'batch_size': 16, 'total_steps': 20,
                       'optimizer.base_learning_rate': 0.4,
                       'optimizer.warmup_steps': 2,
                       'log_every_steps': 1, 'checkpoint_every_steps': 0}


def cli_overrides(overrides: dict) -> list[str]:
  """`--config.key=value` flags; tuples as Python literals."""
  return [f'--config.{k}={v!r}' if isinstance(v, tuple) else
          f'--config.{k}={v}' for k, v in overrides.items()]


def load_config(name: str, overrides: dict):
  """`configs/<name>.py` with `--config.key=value` flags, as train.py."""
  argv = ['test', f'--config={REPO / "configs" / (name + ".py")}',
          *cli_overrides(overrides)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def run_in_process(config, workdir) -> tuple[dict, str]:
  """`train_and_evaluate` in this process: its result and its console."""
  from spinenet_jax import train_lib  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = train_lib.train_and_evaluate(config, str(workdir))
  return result, out.getvalue()
