"""Device mesh, shardings and multi-process helpers."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'model')


def create_mesh(mesh_config: Any = None,
                devices: Sequence[jax.Device] | None = None
                ) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over `devices` (default: all devices).

  `mesh_config` is `config.mesh` (None: all devices on 'data'): `data` may
  be -1 (all devices not used by `model`); `model` (1) partitions large
  images spatially.
  """
  data, model = ((-1, 1) if mesh_config is None
                 else (int(mesh_config.data), int(mesh_config.model)))
  n = jax.device_count() if devices is None else len(devices)
  if data == -1:
    if n % model:
      raise ValueError(f'mesh.model={model} does not divide the {n} devices.')
    data = n // model
  if data * model != n:
    raise ValueError(f'mesh data={data} x model={model} does not match the '
                     f'{n} devices.')
  return jax.make_mesh((data, model), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over 'data'; everything else replicated."""
  return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = mesh.shape['data']
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(
        f'batch_size {batch_size} must be divisible by the {n} data-parallel '
        f'devices and the {jax.process_count()} processes.')


def global_batch(local: dict[str, np.ndarray],
                 mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice into global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def to_local(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    if s.index[0].start not in seen:
      seen.add(s.index[0].start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)
