"""Orbax checkpoints of training runs: save, resume, restore onto any mesh."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from spinenet_jax import multihost
from spinenet_jax import quiet_restore

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
COMMIT_FILE = 'commit_success.txt'  # Orbax's marker of a finished save.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


# Arrays smaller than this are written whole by one replica rather than split
# across the replicas that hold them: splitting costs a sliced copy (and, the
# first time, a compilation) per array and replica, which only pays off for
# large arrays.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=(
              MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL))),
      (np.ndarray, th.NumpyHandler()),
      (int, th.ScalarHandler()), (float, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def create_manager(workdir: str, keep: int = 3,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for `WORKDIR/checkpoints/<step>` keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers={'state': _state_handler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         force: bool = False) -> bool:
  """Starts an (async) save of `state` at `step`."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state)), force=force)


class CheckpointError(RuntimeError):
  """A run's checkpoints cannot be used (the message says why and the fix)."""


class DamagedCheckpointError(CheckpointError):
  """One checkpoint's files are corrupt, truncated or missing."""


class IncompatibleCheckpointError(CheckpointError):
  """A checkpoint holds other variables than the model (another config)."""


def step_dir(directory: str, step: int) -> str:
  return os.path.join(os.fspath(directory), str(step))


def is_committed(directory: str, step: int) -> bool:
  """True when Orbax finished the save: it renames the temporary directory
  to `<step>` and writes its commit marker last."""
  return os.path.exists(os.path.join(step_dir(directory, step), COMMIT_FILE))


def _leaf_name(path) -> str:
  """Orbax's dotted name of a leaf ('opt_state.1.0.trace.backbone...')."""
  def part(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return '.'.join(part(k) for k in path)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {_leaf_name(p): (tuple(x.shape), str(np.dtype(x.dtype)))
          for p, x in leaves if x is not None}


def saved_shapes(manager: ocp.CheckpointManager, step: int
                 ) -> dict[str, tuple[tuple[int, ...], str]]:
  """Dotted variable name -> (shape, dtype) from a checkpoint's metadata."""
  where = step_dir(manager.directory, step)
  try:
    shapes = _shapes(manager.item_metadata(step)['state'])
  except Exception as e:  # Orbax raises many types for damaged files.
    raise DamagedCheckpointError(
        f'{where}: its metadata cannot be read '
        f'({quiet_restore.first_line(e)})') from None
  if not shapes:  # Orbax returns empty metadata when its file is missing.
    raise DamagedCheckpointError(f'{where}: its metadata lists no arrays '
                                 '(state/_METADATA missing or empty)')
  return shapes


def check_compatible(manager: ocp.CheckpointManager, step: int,
                     abstract_state: Any, hint: str = '') -> None:
  """Raises IncompatibleCheckpointError naming the first variable whose
  presence, shape or dtype differs between the checkpoint and the model
  (`hint`, e.g. `config_difference`'s, is added to the message)."""
  saved, want = saved_shapes(manager, step), _shapes(abstract_state)
  where = step_dir(manager.directory, step)
  for name in sorted(set(saved) | set(want)):
    if name not in saved:
      problem = f'the model has {name} {_fmt(want[name])}, the checkpoint not'
    elif name not in want:
      problem = f'the checkpoint has {name} {_fmt(saved[name])}, the model not'
    elif saved[name] != want[name]:
      problem = (f'{name} is {_fmt(saved[name])} in the checkpoint and '
                 f'{_fmt(want[name])} in the model')
    else:
      continue
    raise IncompatibleCheckpointError(
        f'Checkpoint {where} was written by a different configuration: '
        f'{problem}.{hint} Resume with the config the run was trained '
        'with, or train into a new --workdir.')


def _fmt(shape_dtype: tuple[tuple[int, ...], str]) -> str:
  return f'{shape_dtype[0]} {shape_dtype[1]}'


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None, hint: str = '') -> Any:
  """Restores `step` (default latest) with the target's shapes and shardings.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings (for
  example `jax.eval_shape` of the initialiser plus the current mesh's
  shardings), so a checkpoint written on N devices restores onto M.

  Raises:
    DamagedCheckpointError: files are missing, truncated or corrupt, or the
      save never committed.
    IncompatibleCheckpointError: the checkpoint holds other variables (shapes,
      dtypes or names) than `abstract_state`; nothing is read.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  where = step_dir(manager.directory, step)
  if not is_committed(manager.directory, step):
    raise DamagedCheckpointError(f'{where}: the save never finished (no '
                                 f'{COMMIT_FILE})')
  check_compatible(manager, step, abstract_state, hint)
  state, error = quiet_restore.read(lambda: manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_state)))).state)
  if error is not None:
    raise DamagedCheckpointError(f'{where}: its arrays cannot be read '
                                 f'({error})')
  return state


def restore_newest_good(manager: ocp.CheckpointManager, abstract_state: Any,
                        warn=print, hint: str = ''
                        ) -> tuple[Any, int | None]:
  """The newest checkpoint that restores, and its step; (None, None) if none.

  Newer checkpoints that are damaged are moved aside to `<step>.corrupt`
  (never deleted), each with one warning, once an older one has restored. If
  every checkpoint is damaged nothing is moved and CheckpointError says which
  and why. A checkpoint of another configuration is never moved: its
  IncompatibleCheckpointError propagates.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore(manager, abstract_state, step, hint)
    except DamagedCheckpointError as e:
      damaged.append((step, e))
      continue
    for bad, e in damaged:
      warn(f'WARNING: checkpoint {bad} is damaged and was moved to '
           f'{quarantine(manager.directory, bad)}: {e}. Resuming from step '
           f'{step}.')
    if damaged:
      manager.reload()
    return state, step
  if damaged:
    reasons = '; '.join(str(e) for _, e in damaged)
    raise CheckpointError(
        f'None of the {len(damaged)} checkpoints in {manager.directory} '
        f'restores ({reasons}). Nothing was moved. Restore the files, or '
        'move the checkpoints directory away to train from scratch.')
  return None, None


def quarantine(directory: str, step: int) -> str:
  """Renames `<step>` to `<step>.corrupt` (process 0; all processes wait)."""
  source = step_dir(directory, step)
  target = source + '.corrupt'
  if jax.process_index() == 0:
    n = 1
    while os.path.exists(target):
      n += 1
      target = f'{source}.corrupt{n}'
    os.rename(source, target)
  multihost.wait_for_all_processes(f'spinenet_jax_quarantine_{step}')
  return target


# Config fields that decide the variables' names and shapes.
_SHAPE_FIELDS = ('task', 'model.', 'optimizer.name', 'optimizer.ema_decay',
                 'optimizer.momentum')


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def config_difference(workdir: str, config: ml_collections.ConfigDict,
                      limit: int = 6) -> str:
  """' The run was trained with model.x=a; this config has model.x=b.', from
  the run's saved config.json, for the fields that shape the variables; ''
  when there is no saved config or no such difference."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    saved = _flatten(json.load(f))
  current = _flatten(json.loads(config.to_json()))
  fields = [k for k in sorted(set(saved) | set(current))
            if k.startswith(_SHAPE_FIELDS) and saved.get(k) != current.get(k)]
  if not fields:
    return ''
  fmt = lambda d: ', '.join(f'{k}={d.get(k)!r}' for k in fields[:limit])
  return (f' The run was trained with {fmt(saved)}; this config has '
          f'{fmt(current)}.')


def saved_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `WORKDIR/checkpoints`, ascending.

  Orbax writes into a temporary directory, renames it to `<step>` when the
  save is complete and then writes its commit marker, so unfinished saves
  (and damaged ones moved aside to `<step>.corrupt`) are not listed.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and is_committed(directory, int(d)))


def restore_arrays(workdir: str, step: int | None = None) -> dict[str, Any]:
  """A saved train state as nested dicts of NumPy arrays, without a model.

  Returns the state at `step` (default: the latest) with the fields of
  `train_lib.TrainState` as keys ('step', 'params', 'batch_stats',
  'opt_state', 'ema_params'), for inspection, comparison and conversion
  on any number of devices.
  """
  steps = saved_steps(workdir)
  if step is None:
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)}.')
    step = steps[-1]
  path = os.path.join(checkpoint_dir(workdir), str(step), 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the run's config as JSON beside the checkpoints (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(path + '.tmp', path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: not a training '
                            'run directory.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
