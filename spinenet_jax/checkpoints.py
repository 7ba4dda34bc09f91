"""Orbax checkpoints of training runs: save, resume, restore onto any mesh."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(workdir: str, keep: int = 3,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for `WORKDIR/checkpoints/<step>` keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         force: bool = False) -> bool:
  """Starts an (async) save of `state` at `step`."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)), force=force)


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
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # Orbax raises many types for damaged files.
    raise ValueError(f'Checkpoint {manager.directory}/{step} cannot be '
                     f'restored (corrupt, incomplete or from a different '
                     f'model): {type(e).__name__}: {e}') from e
  return restored.state


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
