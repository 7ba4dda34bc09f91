"""Test set-up: 8 CPU devices, configured before JAX creates its backends.

Also the fixtures that several test modules share: a 2-step demo detection
run trained once per session (`det_workdir`, `det_run`) and the images that
the inference, predict and draw tests feed it.
"""
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
  spec = importlib.util.spec_from_file_location(
      f'_cfg_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny(c, data_dir):
  c.data.data_dir = str(data_dir)
  c.data.num_train_examples = 32
  c.data.num_eval_examples = 8
  c.data.shapes_image_size = 128
  c.data.image_size = 128
  c.batch_size = 8
  c.total_steps = 2
  c.model.filter_size_scale = 0.125
  c.model.endpoints_num_filters = 16
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.async_checkpoints = False
  return c


@pytest.fixture(scope='session')
def tiny_run_config():
  """`(config name, data_dir) -> configs/NAME.py` shrunk to a 2-step run."""
  return lambda name, data_dir: _tiny(_config(name), data_dir)


@pytest.fixture(scope='session')
def det_workdir(tmp_path_factory, tiny_run_config):
  """A 2-step demo detection run (EMA on, so that its path is covered)."""
  from spinenet_jax import train_lib  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('det')
  c = tiny_run_config('demo', tmp / 'tfds')
  c.model.head_num_convs = 1
  c.model.head_num_filters = 16
  c.optimizer.ema_decay = 0.9
  train_lib.train_and_evaluate(c, str(tmp / 'run'))
  return str(tmp / 'run')


@pytest.fixture(scope='session')
def det_run(det_workdir):
  import spinenet_jax  # pylint: disable=g-import-not-at-top
  return spinenet_jax.load_checkpoint(det_workdir)


@pytest.fixture
def sample_images():
  """Two RGB images of different sizes and aspect ratios."""
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (100, 150, 3), np.uint8),
          rng.integers(0, 256, (200, 90, 3), np.uint8)]
