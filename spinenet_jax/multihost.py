"""Helpers for runs over several JAX processes (no-ops in a single process)."""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from orbax.checkpoint import multihost as ocp_multihost


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(
      np.array([flag], np.int32))))


def sum_over_processes(values: list[int]) -> np.ndarray:
  """Element-wise sums of `values` over the processes (a collective)."""
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values)).sum(0)


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of the distributed runtime's coordination service.

  Unlike a device collective (`multihost_utils.sync_global_devices`), it
  waits for peers as long as `timeout_s`; CPU (gloo) collectives give up
  when peers arrive about 30 s apart. Orbax's barrier function wraps the
  coordination service client that `jax.distributed.initialize` started.
  """
  if jax.process_count() == 1:
    return
  barrier = ocp_multihost.get_barrier_sync_fn()
  barrier(key=name, timeout_ms=timeout_s * 1000)


def compile_then_sync(fn: Any, *args: Any) -> Any:
  """Compiles the jitted `fn` for `args`, then waits for every process.

  Processes can finish compiling far apart (one hits the persistent
  compilation cache, another compiles), so the step is compiled ahead and
  the processes start it together.
  """
  compiled = fn.lower(*args).compile()
  wait_for_all_processes(f'spinenet_jax_compiled_{fn.__name__}')
  return compiled
