"""Early, central validation of a training config, before anything is built.

`validate(config, num_devices)` raises a `ConfigError` for the first problem:
one paragraph with the field (`config.<dotted.path>`), its bad value, what is
wrong and a fix. The modules keep their own checks (`sharding`, `optim`,
`models`, `specs`); this finds those mistakes earlier, and some that would
pass silently (misspelt keys, step decays inside the warmup).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Any, NoReturn

import jax
import ml_collections

from configs import common
from input_pipeline import contract
from input_pipeline import sources
from spinenet_jax import conv_impl
from spinenet_jax import layers
from spinenet_jax import models
from spinenet_jax import nonfinite
from spinenet_jax import norm_impl
from spinenet_jax import remat
from spinenet_jax import specs as specs_lib

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('step', 'cosine')
# The endpoint levels a SpineNet backbone (and the RetinaNet head) supports.
LEVELS = (3, 7)
# Keys a config may set beyond its task's base config and model fields:
# `data.max_image_pixels` (input_pipeline/sanitize.py, read with .get).
OPTIONAL_KEYS = {'data': {'max_image_pixels'}}
# Fixes for keys that are in the wrong place rather than misspelt.
KEY_HINTS = {'model.dtype': 'remove it: the compute dtype is config.dtype'}
# TFDS labels of classification datasets that `contract` has no map for.
NUM_LABELS = {'imagenet2012': 1000, 'imagenette': 10, 'cifar10': 10,
              'cifar100': 100, 'mnist': 10, 'oxford_flowers102': 102}


class ConfigError(ValueError):
  """A config that cannot train: names the field, its value and a fix."""


def _fail(path: str, value: Any, problem: str, fix: str) -> NoReturn:
  """Raises `config.<path>=<value> <problem>; <fix>.` (long values cut)."""
  text = repr(value)
  text = text if len(text) <= 80 else text[:76] + ' ...'
  raise ConfigError(f'config.{path}={text} {problem}; {fix}.')


def _is_int(v: Any, types: tuple[type, ...] = (int,)) -> bool:
  """Whether `v` is an int (or one of `types`), not a bool."""
  return isinstance(v, types) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return _is_int(v, (int, float))


def _one_of(path: str, value: Any, choices: Any, what: str,
            nearest: Any = None) -> None:
  """Fails unless `value` is one of `choices`, suggesting the nearest (by
  `nearest(value, choices)` if given, else by spelling)."""
  choices = list(choices)
  if value in choices:
    return
  same_case = [c for c in choices if str(c).lower() == str(value).lower()]
  near = same_case or (nearest and nearest(value, choices)) or (
      difflib.get_close_matches(str(value), choices, 1))
  fix = f'did you mean {near[0]!r}? Otherwise use' if near else 'use'
  _fail(path, value, f'is not a known {what}', f'{fix} one of {choices}')


def _check_number(path: str, value: Any, low: float | None = None,
                  high: float | None = None, *, integer: bool = False,
                  optional: bool = False, strict: bool = False) -> None:
  """Fails unless `value` is a number in [low, high) ((low, high) if
  `strict`); None passes when `optional`."""
  if value is None and optional:
    return
  kind = 'an integer' if integer else 'a number'
  if not (_is_int(value) if integer else _is_number(value)):
    _fail(path, value, f'is not {kind}',
          f'set {kind}' + (' (or None to leave it unset)' if optional else ''))
  if low is not None and (value <= low if strict else value < low):
    bound = f'> {low}' if strict else f'>= {low}'
    _fail(path, value, f'is out of range (it must be {bound})',
          f'use a value {bound}')
  if high is not None and value >= high:
    _fail(path, value, f'is out of range (it must be < {high})',
          f'use a value in [{low}, {high})')


def allowed_keys(task: str, dataset: str) -> dict[str, set[str]]:
  """Prefix ('' for the top level, 'model', 'data', ...) -> its known keys.

  From configs/common.py's base config of `task`, plus the fields of the
  task's model that `models.build_model` accepts (se_ratio, min_level, ...;
  not `dtype`, which comes from `config.dtype`), plus `OPTIONAL_KEYS`.
  """
  ref = (common.detection_config(dataset) if task == 'retinanet'
         else common.classification_config(dataset))
  out: dict[str, set[str]] = {}

  def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
    out[prefix] = set(node.keys())
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f'{prefix}.{key}' if prefix else key)

  walk(ref, '')
  fields = {f.name for f in dataclasses.fields(models.TASKS[task])}
  out['model'] |= fields - {'parent', 'name', 'dtype'}
  for prefix, keys in OPTIONAL_KEYS.items():
    out[prefix] |= keys
  return out


def check_keys(config: ml_collections.ConfigDict,
               allowed: dict[str, set[str]], prefix: str = '') -> None:
  """Fails on the first key not in `allowed` (a typo), nearest suggested."""
  for key in config.keys():
    path, known = f'{prefix}.{key}' if prefix else key, allowed[prefix]
    if key not in known:
      where = f'config.{prefix}' if prefix else 'the top level of config'
      near = difflib.get_close_matches(key, sorted(known), 1, 0.6)
      fix = (KEY_HINTS.get(path) or
             (f'did you mean config.{prefix + "." if prefix else ""}'
              f'{near[0]}? Rename it, or remove it' if near else
              f'remove it (known keys: {sorted(known)})'))
      _fail(path, config[key], f'is not a known key of {where} (compared '
            "with configs/common.py's base config for this task)", fix)
    if isinstance(config[key], ml_collections.ConfigDict) and path in allowed:
      check_keys(config[key], allowed, path)


def nearest_model_id(value: Any, ids: list[str]) -> list[str]:
  """[the id with the same suffix and the closest number] ('48' -> '49',
  '100_mobile' -> '49_mobile'), or [] when none shares the suffix."""
  m = re.fullmatch(r'(\d+)(.*)', str(value))
  if not m:
    return []
  same = [(abs(int(i.group(1)) - int(m.group(1))), i.group(0))
          for i in map(lambda x: re.fullmatch(r'(\d+)(.*)', x), ids)
          if i and i.group(2).lower() == m.group(2).lower()]
  return [min(same)[1]] if same else []


def check_model(config: ml_collections.ConfigDict) -> int:
  """Model id, levels, permutation, rates, classes; returns the highest
  level of the backbone (its input size must divide by 2 to that power)."""
  m = config.model
  ids = sorted(specs_lib.SCALING_MAP) + specs_lib.mobile_model_ids()
  model_id = m.get('model_id', '49')
  _one_of('model.model_id', model_id, ids, 'SpineNet model id',
          nearest_model_id)
  if m.get('activation') is not None:
    _one_of('model.activation', m.activation, sorted(layers.ACTIVATIONS),
            'activation')
  _one_of('model.conv_impl', m.get('conv_impl', 'auto'), conv_impl.CHOICES,
          'convolution lowering')
  _one_of('model.norm_impl', m.get('norm_impl', 'auto'), norm_impl.CHOICES,
          'batch-norm gradient')
  _one_of('model.remat', m.get('remat', 'none'), remat.MODES,
          'rematerialisation mode')
  _check_number('model.stochastic_depth_rate',
                m.get('stochastic_depth_rate', 0.0), 0.0, 1.0)
  lo, hi = m.get('min_level', 3), m.get('max_level', 7)
  for name, level in (('min_level', lo), ('max_level', hi)):
    if not _is_int(level) or not LEVELS[0] <= level <= LEVELS[1]:
      _fail(f'model.{name}', level, 'is outside the levels '
            f'{LEVELS[0]}..{LEVELS[1]} that the SpineNet backbone emits',
            f'use an integer in {LEVELS[0]}..{LEVELS[1]} (default: '
            f'{3 if name == "min_level" else 7})')
  if lo > hi:
    _fail('model.min_level', lo, f'is above config.model.max_level={hi}',
          f'use min_level <= max_level, e.g. {LEVELS[0]} and {LEVELS[1]}')
  family = (specs_lib.SPINENET_MOBILE if specs_lib.is_mobile(model_id)
            else specs_lib.SPINENET)
  try:
    _, nodes, _ = family.plan(m.get('block_specs'), 1.0, lo, hi)
  except ValueError as e:
    _fail('model.block_specs', m.get('block_specs'),
          f'is not a valid permutation for levels {lo}..{hi}: '
          f'{str(e).rstrip(".")}',
          'fix that block, or set None for the model id\'s permutation')
  check_num_classes(config)
  return max([n.level for n in nodes] + [hi])


def check_num_classes(config: ml_collections.ConfigDict) -> None:
  """Class count: RetinaNet's includes background (class 0, unused)."""
  n, data = config.model.get('num_classes'), config.data
  detection = config.task == 'retinanet'
  name, offset = data.get('name', ''), data.get('label_offset', 0)
  if sources.is_source(name):
    _check_num_classes_of_source(config, n, detection)
    return
  ids = contract.label_map(name, detection, offset)
  if ids:
    need = max(ids) + 1
    why = f"{name}'s class ids go up to {max(ids)}"
  elif not detection and name.split('/')[0] in NUM_LABELS:
    need = NUM_LABELS[name.split('/')[0]] + offset
    why = (f'{name} has {need - offset} labels (class id = TFDS label + '
           f'label_offset={offset})')
  else:
    need, why = (2, 'the dataset needs at least one class') if detection \
        else (1, 'a classifier needs at least one class')
  if _is_int(n) and n >= need:
    return
  if detection:
    _fail('model.num_classes', n, 'does not include background: RetinaNet '
          f'reserves class 0 for background and {why}',
          f'use {need} (the number of classes + 1 for background)')
  _fail('model.num_classes', n, f'is too small: {why}', f'use at least {need}')


def _check_num_classes_of_source(config: ml_collections.ConfigDict, n: Any,
                                 detection: bool) -> None:
  """User data: num_classes must equal what the prepared data has."""
  need = sources.num_classes(config.data, detection)
  if n == need:
    return
  k = len(sources.dataset_meta(config.data)['classes'])
  what = (f'the {config.data.name} data has {k} classes, + 1 for background'
          if detection else f'the {config.data.name} data has {k} classes '
          f'(+ label_offset={config.data.get("label_offset", 0)})')
  _fail('model.num_classes', n, f'does not match the data: {what} = {need}',
        f'set --config.model.num_classes={need}, or None in the config file '
        'to take it from the data (configs/finetune.py does)')


def data_shards(mesh: Any, num_devices: int) -> int:
  """Size of the mesh's 'data' axis, as `sharding.create_mesh` derives it."""
  data, model = mesh.get('data', -1), mesh.get('model', 1)
  if not _is_int(model) or model < 1:
    _fail('mesh.model', model, 'is not a positive integer',
          'use 1 unless large images are partitioned spatially')
  if data == -1:
    if num_devices % model:
      divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
      _fail('mesh.model', model, f'does not divide the {num_devices} devices',
            f'use one of {divisors}')
    return num_devices // model
  if not _is_int(data) or data < 1 or data * model != num_devices:
    _fail('mesh.data', data, f'x config.mesh.model={model} does not multiply '
          f'to the {num_devices} devices',
          'use config.mesh.data=-1 (the devices not used by mesh.model)' +
          (f' or {num_devices // model}' if num_devices % model == 0 else ''))
  return data


def _check_batch(path: str, value: Any, shards: int, num_devices: int
                 ) -> None:
  """Fails unless `value` is a positive multiple of `shards`."""
  if not _is_int(value) or value < 1:
    _fail(path, value, 'is not a positive integer',
          f'use a positive multiple of the {shards} data shards')
  if value % shards:
    _fail(path, value, f'is not divisible by the {shards} data shards (the '
          f"mesh's 'data' axis over {num_devices} devices)",
          f'use a multiple of {shards}, e.g. '
          f'{math.ceil(value / shards) * shards}')


def check_batch_and_mesh(config: ml_collections.ConfigDict,
                         num_devices: int) -> None:
  """Mesh axes against the devices; train and eval batches against it."""
  shards = data_shards(config.mesh, num_devices)
  slices = config.mesh.get('slices', 1)
  if not _is_int(slices) or slices < 1 or shards % slices:
    divisors = [d for d in range(1, shards + 1) if shards % d == 0]
    _fail('mesh.slices', slices, f"does not divide the mesh's 'data' axis "
          f'({shards} devices)', f'use one of {divisors} (1 unless the run '
          'spans several slices of a pod)')
  batch, eval_batch = config.get('batch_size'), config.get('eval_batch_size')
  if not (eval_batch or batch):
    _fail('eval_batch_size', eval_batch, f'with config.batch_size={batch!r} '
          'leaves evaluation without a batch size (0 or None means '
          'config.batch_size)', f'set config.batch_size to a positive '
          f'multiple of {shards}')
  _check_batch('batch_size', batch, shards, num_devices)
  if eval_batch is not None and eval_batch != 0:
    _check_batch('eval_batch_size', eval_batch, shards, num_devices)


def check_image_size(config: ml_collections.ConfigDict, top: int) -> None:
  """Image size: positive; RetinaNet's divides by 2**top (no resizing)."""
  size = config.data.image_size
  _check_number('data.image_size', size, 1, integer=True)
  multiple = 2**top
  if config.task == 'retinanet' and size % multiple:
    _fail('data.image_size', size, f'is not divisible by 2**max_level = '
          f'{multiple} ({_levels(config, top)})', f'use a multiple of '
          f'{multiple}, e.g. {_near_multiple(size, multiple)}')


def _near_multiple(size: int, multiple: int) -> int:
  """The multiple of `multiple` nearest `size` (at least `multiple`)."""
  return max(round(size / multiple), 1) * multiple


def _levels(config: ml_collections.ConfigDict, top: int) -> str:
  """'max_level=7', with the top block's level where that is higher."""
  hi = config.model.get('max_level', 7)
  return f'max_level={hi}' + (f', blocks up to level {top}' if top > hi
                              else '')


def check_spatial_partitioning(config: ml_collections.ConfigDict,
                               top: int) -> None:
  """With mesh.model = k > 1 the image size divides by k * 2**top, so that
  every feature map's height splits evenly over the 'model' axis."""
  size, multiple = config.data.image_size, 2**top
  k = config.mesh.get('model', 1)
  if k > 1 and size % (k * multiple):
    _fail('data.image_size', size, f'is not divisible by mesh.model x '
          f'2**max_level = {k} x {multiple} = {k * multiple} '
          f'({_levels(config, top)}): spatial partitioning splits the '
          f'height of every feature map, down to level {top}, over the {k} '
          f"devices of the 'model' axis", f'use a multiple of '
          f'{k * multiple}, e.g. {_near_multiple(size, k * multiple)}, '
          f'or a smaller config.mesh.model')


def check_durations(config: ml_collections.ConfigDict) -> int | None:
  """Run length and cadences; returns total steps when given in steps."""
  total = config.get('total_steps')
  if total is not None:
    _check_number('total_steps', total, 1, integer=True)
  elif not _is_number(config.get('num_epochs')) or config.num_epochs <= 0:
    _fail('num_epochs', config.get('num_epochs'), 'with config.total_steps='
          'None leaves the run without a length',
          'set config.total_steps or config.num_epochs to a positive number')
  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'eval_every_epochs', 'checkpoint_every_epochs'):
    _check_number(key, config.get(key), 0, integer=key.endswith('_steps'),
                  optional=True)
  _check_number('keep_checkpoints', config.get('keep_checkpoints', 1), 1,
                integer=True)
  _one_of('nan_policy', config.get('nan_policy', 'stop'), nonfinite.POLICIES,
          'non-finite loss policy')
  _check_number('nan_max_rollbacks', config.get('nan_max_rollbacks', 0), 0,
                integer=True)
  return total


def check_optimizer(opt: ml_collections.ConfigDict, total: int | None) -> None:
  """Optimizer and schedule; boundaries against `total` steps if known."""
  _one_of('optimizer.name', opt.name, OPTIMIZERS, 'optimizer')
  _one_of('optimizer.schedule', opt.schedule, SCHEDULES, 'schedule')
  _check_number('optimizer.base_learning_rate', opt.base_learning_rate, 0,
                strict=True)
  _check_number('optimizer.warmup_learning_rate', opt.warmup_learning_rate, 0)
  _check_number('optimizer.weight_decay', opt.weight_decay, 0)
  _check_number('optimizer.grad_clip_norm', opt.grad_clip_norm, 0, strict=True,
                optional=True)
  _check_number('optimizer.ema_decay', opt.ema_decay, 0, 1, optional=True)
  warmup = opt.warmup_steps
  _check_number('optimizer.warmup_steps', warmup, 0, integer=True,
                optional=True)
  if total is not None and warmup is not None and warmup > total:
    _fail('optimizer.warmup_steps', warmup, f'is past config.total_steps='
          f'{total}: the learning rate never reaches its peak',
          f'use at most {total} (e.g. {max(total // 20, 1)}) or None')
  if opt.schedule != 'step':
    return
  _check_number('optimizer.decay_factor', opt.decay_factor, 0, strict=True)
  for f in opt.decay_at:
    if not _is_number(f) or not 0 < f <= 1:
      hint = (f' e.g. {f / total:.4g} for step {f}'
              if total and _is_number(f) and 1 < f <= total else '')
      _fail('optimizer.decay_at', tuple(opt.decay_at), f'has {f!r}, past the '
            'end of training: entries are fractions of the total steps',
            f'use fractions in (0, 1],{hint or " e.g. 0.8"}')
    if total and warmup and int(f * total) <= warmup:
      _fail('optimizer.decay_at', tuple(opt.decay_at), f'puts a decay at step '
            f'{int(f * total)}, inside the {warmup} warmup steps, where it is '
            'ignored', f'use fractions above warmup_steps / total_steps = '
            f'{warmup / total:.4g}')


def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None) -> None:
  """Raises a `ConfigError` for the first problem of a training config.

  Args:
    config: a training config (configs/*.py `get_config()`, with overrides).
    num_devices: devices the mesh spans; None: `jax.device_count()`.
  """
  n = jax.device_count() if num_devices is None else num_devices
  if not _is_int(n) or n < 1:
    raise ConfigError(f'num_devices={n!r} is not a positive integer; pass '
                      'the number of devices, or None for all of them.')
  _one_of('task', config.get('task'), sorted(models.TASKS), 'task')
  check_keys(config, allowed_keys(config.task, config.data.get('name', '')))
  _one_of('dtype', config.get('dtype', 'float32'), sorted(models.DTYPES),
          'compute dtype')
  _one_of('init_from_parts', config.get('init_from_parts', 'backbone+head'),
          ['backbone', 'backbone+head'], 'part to fine-tune from')
  if config.get('init_from') and not os.path.isdir(config.init_from):
    _fail('init_from', config.init_from, 'is not a directory',
          'use a run directory (with checkpoints/ and config.json), e.g. '
          'runs/demo, or leave it unset to train from scratch')
  top = check_model(config)
  check_image_size(config, top)
  check_batch_and_mesh(config, n)
  check_spatial_partitioning(config, top)
  total = check_durations(config)
  check_optimizer(config.optimizer, total)
