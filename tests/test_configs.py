"""configs/: pure data (no TensorFlow at parse time), durations in epochs that
keep their meaning when the batch size is overridden."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from spinenet_jax import optim

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                      if p.stem != '__init__')
COCO_TRAIN_EXAMPLES = 118_287  # TFDS coco/2017 train.


def load_config(name: str, *overrides: str):
  """`configs/<name>.py` through the same flag parser as train.py."""
  argv = ['test', f'--config={REPO / "configs" / (name + ".py")}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_configs_import_no_tensorflow():
  """Parsing any config imports ml_collections only (no TF, no JAX)."""
  code = ('import sys\n'
          f'for name in {CONFIG_FILES!r}:\n'
          '  module = __import__("configs." + name, fromlist=["x"])\n'
          '  if hasattr(module, "get_config"):\n'
          '    module.get_config()\n'
          'heavy = [m for m in ("tensorflow", "jax", "tensorflow_datasets")\n'
          '         if m in sys.modules]\n'
          'assert not heavy, heavy\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', ['spinenet49_coco', 'spinenet49_mobile_coco'])
def test_batch_64_evaluates_and_checkpoints_at_the_recipes_epochs(name):
  """The README's --config.batch_size=64 keeps the batch-256 cadences in
  epochs (evaluation every 25, checkpoints every 5) and the schedule length."""
  n = lambda: COCO_TRAIN_EXAMPLES
  recipe = load_config(name)
  small = load_config(name, '--config.batch_size=64')
  assert recipe.batch_size == 256
  for duration in ('total', 'eval_every', 'checkpoint_every'):
    examples_256 = optim.steps(recipe, duration, n) * 256
    examples_64 = optim.steps(small, duration, n) * 64
    # The same point in the data, to within one batch of the recipe.
    assert abs(examples_64 - examples_256) < 256, duration
  epochs = lambda c, d: optim.steps(c, d, n) * c.batch_size / n()
  assert epochs(small, 'eval_every') == pytest.approx(25, rel=2e-3)
  assert epochs(small, 'checkpoint_every') == pytest.approx(5, rel=2e-3)
  assert optim.steps(recipe, 'total', n) == recipe.num_epochs * 462  # MG's.


def test_steps_win_over_epochs_and_unset_is_none():
  config = load_config('spinenet49_coco', '--config.eval_every_steps=7')
  assert optim.steps(config, 'eval_every', lambda: COCO_TRAIN_EXAMPLES) == 7
  demo = load_config('demo')
  assert optim.steps(demo, 'eval_every') is None  # Only at the end.
  assert optim.steps(demo, 'total') == 2100  # No dataset size needed.
  with pytest.raises(ValueError, match='num_epochs'):
    optim.total_steps(load_config('demo', '--config.total_steps=0'))
