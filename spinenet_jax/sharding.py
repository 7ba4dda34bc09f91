"""Device mesh, shardings and multi-process helpers."""

from __future__ import annotations

from typing import Any, Sequence

from absl import logging
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
  images spatially; `slices` (1) splits 'data' into that many slices of a
  multi-slice pod (`hybrid_devices`).
  """
  data, model = ((-1, 1) if mesh_config is None
                 else (int(mesh_config.data), int(mesh_config.model)))
  slices = 1 if mesh_config is None else int(mesh_config.get('slices', 1))
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if data == -1:
    if n % model:
      raise ValueError(f'mesh.model={model} does not divide the {n} devices.')
    data = n // model
  if data * model != n:
    raise ValueError(f'mesh data={data} x model={model} does not match the '
                     f'{n} devices.')
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  if slices > 1:
    return jax.sharding.Mesh(hybrid_devices(data, model, slices, devices),
                             MESH_AXES, axis_types=axis_types)
  return jax.make_mesh((data, model), MESH_AXES, axis_types=axis_types,
                       devices=devices)


def hybrid_devices(data: int, model: int, slices: int,
                   devices: Sequence[Any]) -> np.ndarray:
  """A [data, model] device array for a multi-slice run: 'data' is slice
  major, `slices` x (data / slices), and 'model' stays inside a slice, so
  XLA reduces gradients within each slice over ICI and across slices over
  DCN (`jax.experimental.mesh_utils.create_hybrid_device_mesh`).

  Slices come from the devices' `slice_index` (multi-slice TPU); devices
  without it (GPU hosts, CPU) take processes as slices when there are
  `slices` processes, with a warning that says so; otherwise a ValueError
  names the mismatch.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  if data % slices:
    raise ValueError(f'mesh.slices={slices} does not divide the data axis '
                     f'({data} devices); use a divisor of {data}.')
  granule = 'slice_index'
  if not hasattr(devices[0], 'slice_index'):
    processes = len({d.process_index for d in devices})
    if processes != slices:
      raise ValueError(
          f'mesh.slices={slices}, but the devices have no slice_index (not '
          f'a multi-slice TPU) and the {processes} processes cannot stand '
          f'in for {slices} slices; use mesh.slices=1 or {processes}.')
    granule = 'process_index'
    logging.warning('mesh.slices=%d: the devices have no slice_index (not a '
                    'multi-slice TPU), so each of the %d processes counts as '
                    'a slice.', slices, processes)
  found = len({getattr(d, granule) for d in devices})
  if found != slices:
    raise ValueError(f'mesh.slices={slices}, but the devices belong to '
                     f'{found} slices; use mesh.slices={found}.')
  return mesh_utils.create_hybrid_device_mesh(
      (data // slices, model), (slices, 1), devices,
      process_is_granule=granule == 'process_index')


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over 'data'; everything else replicated."""
  return NamedSharding(mesh, P('data'))


def partition_images(batch: dict[str, jax.Array],
                     mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Spatial partitioning (inside a jitted step): the images' height over
  the mesh's 'model' axis when it is larger than 1, so that every feature
  map's height follows and XLA's SPMD partitioner exchanges the halos of
  the convolutions. The batch arrives on 'data' only; taking each device's
  rows of it needs no communication."""
  if mesh.shape['model'] == 1:
    return batch
  image = jax.lax.with_sharding_constraint(
      batch['image'], NamedSharding(mesh, P('data', 'model')))
  return dict(batch, image=image)


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
