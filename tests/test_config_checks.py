"""config_checks.validate: every shipped config passes; each kind of mistake
raises a ConfigError naming the field, its bad value and a fix. Pure Python:
no model is built, nothing is compiled."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from input_pipeline import sources
from spinenet_jax import config_checks
from spinenet_jax.config_checks import ConfigError
from tests import tiny

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'common'))
# Device counts that divide each shipped config's batch size (default: 256).
DEVICES = {'demo': (1, 2, 4), 'search_shapes': (1, 2, 4),
           'shapes_classification': (1, 8, 32), 'finetune': (1, 2, 4),
           'finetune_classification': (1, 8, 32)}
FIX_WORDS = ('use ', 'set ', 'remove', 'rename', 'did you mean')


def shipped(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(); the search config's trial config."""
  config = importlib.import_module(f'configs.{name}').get_config()
  return config.trial if name == 'search_shapes' else config


def with_overrides(name: str, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  """`shipped(name)` with dotted keys set (new keys added, as a typo)."""
  config = shipped(name)
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[key] = value
  return config


@pytest.fixture(scope='module')
def own_data(tmp_path_factory) -> dict[str, dict[str, str]]:
  """Config fields of small generated datasets, per user-data format."""
  from tests import user_data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('own_data')
  return {'coco_json': user_data.write_coco(str(root / 'coco')),
          'image_folder': user_data.write_folders(str(root / 'folders'), 3,
                                                  3)}


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_shipped_configs_validate(name, own_data, tmp_path):
  config = shipped(name)
  if sources.is_source(config.data.name):  # Needs data on disk.
    config.data.update(own_data[config.data.name], data_dir=str(tmp_path))
    config.init_from = str(tmp_path)
    config = sources.resolve_num_classes(config)
  for n in DEVICES.get(name, (1, 8, 256)):
    config_checks.validate(config, num_devices=n)


@pytest.mark.parametrize('name', ['spinenet49_coco', 'spinenet49_mobile_coco',
                                  'spinenet49_imagenet'])
def test_command_line_overrides_validate(name):
  """The README's batch 64 (num_epochs recipes) and a step-count run."""
  config_checks.validate(
      tiny.load_config(name, {'batch_size': 64}), num_devices=8)
  config_checks.validate(
      tiny.load_config(name, {'total_steps': 5000}), num_devices=8)


def test_the_tests_tiny_runs_validate_on_the_8_test_devices():
  """What the training tests pass to train_and_evaluate (conftest: 8 CPU
  devices, so num_devices=None means 8)."""
  config_checks.validate(tiny.load_config('demo', tiny.TINY_DEMO))
  config_checks.validate(tiny.load_config('shapes_classification',
                                          tiny.TINY_CLASSIFICATION))
  with pytest.raises(ConfigError, match='8 data shards'):
    config_checks.validate(shipped('demo'))  # Batch 4 on 8 devices.


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)
  with pytest.raises(ConfigError, match='num_devices=0'):
    config_checks.validate(shipped('demo'), num_devices=0)


# (id, config, overrides, num_devices, field, value as shown, other text).
BAD = [
    ('typo_optimizer', 'demo', {'optimizer.learning_rat': 0.1}, 1,
     'optimizer.learning_rat', '0.1', 'did you mean config.optimizer.'),
    ('typo_model', 'spinenet49_coco', {'model.modle_id': '96'}, 8,
     'model.modle_id', "'96'", 'did you mean config.model.model_id?'),
    ('typo_top_level', 'demo', {'totl_steps': 10}, 1,
     'totl_steps', '10', 'did you mean config.total_steps?'),
    ('typo_data', 'shapes_classification', {'data.imagesize': 64}, 1,
     'data.imagesize', '64', 'did you mean config.data.image_size?'),
    ('model_dtype', 'demo', {'model.dtype': 'bfloat16'}, 1,
     'model.dtype', "'bfloat16'", 'the compute dtype is config.dtype'),
    ('max_level_8', 'demo', {'model.max_level': 8}, 1,
     'model.max_level', '8', '3..7'),
    ('min_level_2', 'spinenet49_coco', {'model.min_level': 2}, 8,
     'model.min_level', '2', '3..7'),
    ('levels_swapped', 'demo', {'model.min_level': 6, 'model.max_level': 4},
     1, 'model.min_level', '6', 'max_level=4'),
    ('bad_block_specs', 'demo',
     {'model.block_specs': ((3, 'bottleneck', (0, 1), True),)}, 1,
     'model.block_specs', "((3, 'bottleneck', (0, 1), True),)", 'level(s)'),
    ('image_size', 'demo', {'data.image_size': 250}, 1,
     'data.image_size', '250', '2**max_level = 128 (max_level=7); use a '
     'multiple of 128, e.g. 256'),
    ('batch_vs_devices', 'demo', {}, 8,
     'batch_size', '4', 'not divisible by the 8 data shards'),
    ('batch_vs_model_axis', 'spinenet49_coco',
     {'batch_size': 6, 'mesh.model': 2}, 8, 'batch_size', '6', '4 data shards'),
    ('eval_batch_vs_devices', 'demo', {'eval_batch_size': 6}, 4,
     'eval_batch_size', '6', 'e.g. 8'),
    ('no_eval_batch', 'demo', {'eval_batch_size': 0, 'batch_size': None}, 1,
     'eval_batch_size', '0', 'batch_size=None'),
    ('no_background_shapes', 'demo', {'model.num_classes': 3}, 1,
     'model.num_classes', '3', 'background'),
    ('no_background_coco', 'spinenet49_coco', {'model.num_classes': 90}, 8,
     'model.num_classes', '90', 'use 91'),
    ('too_few_labels', 'spinenet49_imagenet', {'model.num_classes': 1000}, 8,
     'model.num_classes', '1000', 'at least 1001'),
    ('spatial_height', 'spinenet49_coco', {'mesh.model': 2, 'batch_size': 8},
     8, 'data.image_size', '640', 'mesh.model x 2**max_level = 2 x 128'),
    ('mesh_slices', 'spinenet49_coco', {'mesh.slices': 3}, 8,
     'mesh.slices', '3', "does not divide the mesh's 'data' axis"),
    ('mesh_model_not_divisor', 'spinenet49_coco', {'mesh.model': 3}, 8,
     'mesh.model', '3', 'does not divide the 8 devices'),
    ('mesh_product', 'spinenet49_coco', {'mesh.data': 2, 'mesh.model': 2}, 8,
     'mesh.data', '2', 'does not multiply to the 8 devices'),
    ('model_id_case', 'demo', {'model.model_id': '49s'}, 1,
     'model.model_id', "'49s'", "did you mean '49S'?"),
    ('model_id_nearest', 'demo', {'model.model_id': '48'}, 1,
     'model.model_id', "'48'", "did you mean '49'?"),
    ('model_id_nearest_mobile', 'demo', {'model.model_id': '50_mobile'}, 1,
     'model.model_id', "'50_mobile'", "did you mean '49_mobile'?"),
    ('model_id_unknown', 'spinenet49_coco', {'model.model_id': '50'}, 8,
     'model.model_id', "'50'", "'190'"),
    ('decay_past_end', 'spinenet49_coco', {'optimizer.decay_at': (0.5, 1.2)},
     8, 'optimizer.decay_at', '(0.5, 1.2)', 'fractions'),
    ('decay_in_steps', 'demo', {'optimizer.schedule': 'step',
                                'optimizer.decay_at': (1800,)}, 1,
     'optimizer.decay_at', '(1800,)', 'e.g. 0.8571'),
    ('decay_inside_warmup', 'demo', {'optimizer.schedule': 'step',
                                     'optimizer.decay_at': (0.01,)}, 1,
     'optimizer.decay_at', '(0.01,)', 'inside the 100 warmup steps'),
    ('warmup_past_end', 'demo', {'optimizer.warmup_steps': 3000}, 1,
     'optimizer.warmup_steps', '3000', 'total_steps=2100'),
    ('stochastic_depth_1', 'spinenet49_coco',
     {'model.stochastic_depth_rate': 1.0}, 8,
     'model.stochastic_depth_rate', '1.0', '< 1'),
    ('stochastic_depth_negative', 'demo',
     {'model.stochastic_depth_rate': -0.1}, 1,
     'model.stochastic_depth_rate', '-0.1', '>= 0'),
    ('nan_policy', 'demo', {'nan_policy': 'rollbak'}, 1,
     'nan_policy', "'rollbak'", "did you mean 'rollback'?"),
    ('nan_max_rollbacks', 'demo', {'nan_max_rollbacks': -1}, 1,
     'nan_max_rollbacks', '-1', '>= 0'),
    ('task', 'demo', {'task': 'detection'}, 1,
     'task', "'detection'", "'retinanet'"),
    ('dtype', 'spinenet49_coco', {'dtype': 'bf16'}, 8,
     'dtype', "'bf16'", "'bfloat16'"),
    ('total_steps_0', 'demo', {'total_steps': 0}, 1,
     'total_steps', '0', '>= 1'),
    ('no_length', 'demo', {'total_steps': None}, 1,
     'num_epochs', 'None', 'total_steps=None'),
    ('learning_rate_0', 'demo', {'optimizer.base_learning_rate': 0.0}, 1,
     'optimizer.base_learning_rate', '0.0', '> 0'),
    ('optimizer_name', 'demo', {'optimizer.name': 'adam'}, 1,
     'optimizer.name', "'adam'", "did you mean 'adamw'?"),
    ('activation', 'demo', {'model.activation': 'swich'}, 1,
     'model.activation', "'swich'", "did you mean 'swish'?"),
]


@pytest.mark.parametrize('case', BAD, ids=[c[0] for c in BAD])
def test_bad_config_raises_a_clear_error(case):
  _, name, overrides, num_devices, field, value, text = case
  config = with_overrides(name, overrides)
  with pytest.raises(ConfigError) as info:
    config_checks.validate(config, num_devices=num_devices)
  message = str(info.value)
  assert f'config.{field}={value}' in message, message
  assert text in message, message
  assert any(w in message.lower() for w in FIX_WORDS), message
  assert '\n' not in message


def test_bad_cases_are_distinct_and_cover_the_checks():
  assert len({c[0] for c in BAD}) == len(BAD) >= 12
  assert len({c[4] for c in BAD}) >= 12  # Distinct fields.
