"""Orbax checkpoints of training runs: save, resume, restore onto any mesh."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'


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


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> Any:
  """Restores `step` (default latest) with the target's shapes and shardings.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings (for
  example `jax.eval_shape` of the initialiser plus the current mesh's
  shardings), so a checkpoint written on N devices restores onto M.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state))))
  except Exception as e:  # Orbax raises many types for damaged files.
    raise ValueError(f'Checkpoint {manager.directory}/{step} cannot be '
                     f'restored (corrupt, incomplete or from a different '
                     f'model): {type(e).__name__}: {e}') from e
  return restored.state


def saved_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `WORKDIR/checkpoints`, ascending.

  Orbax writes into a temporary directory and renames it to `<step>` when
  the save is complete, so unfinished saves are not listed.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


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
