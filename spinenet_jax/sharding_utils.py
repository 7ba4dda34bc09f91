"""Helpers for batch-sharded arrays under explicit-sharding meshes.

`jax.make_mesh` creates `Explicit` axes by default: reshapes of sharded
arrays need an output sharding, and `vmap` needs every mapped input sharded
the same way along the batch axis. Outside such a mesh these are no-ops.
`sharding.py` builds the meshes and shardings; these helpers keep an array's
batch sharding through reshapes inside jitted code.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P


def batch_axis(x: jax.Array) -> str | tuple[str, ...] | None:
  """Mesh axis (or None) that the leading axis of `x` is explicitly sharded on."""
  spec = getattr(jax.typeof(x).sharding, 'spec', ())
  return spec[0] if len(spec) else None


def batch_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Reshards `x` so that its leading axis is sharded like `ref`'s."""
  axis = batch_axis(ref)
  if axis is None or batch_axis(x) == axis:
    return x
  want = jax.typeof(ref).sharding.update(spec=P(axis, *[None] * (x.ndim - 1)))
  return jax.sharding.reshard(x, want)


def reshape_keep_batch(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Reshapes `x` keeping the leading (batch) axis and its sharding."""
  axis = batch_axis(x)
  if axis is None:
    return x.reshape(shape)
  out = jax.typeof(x).sharding.update(spec=P(axis, *[None] * (len(shape) - 1)))
  return jax.lax.reshape(x, shape, out_sharding=out)


def num_batch_shards(x: jax.Array) -> int:
  """Number of explicit shards of the leading axis of `x` (1 if none)."""
  axis = batch_axis(x)
  if axis is None:
    return 1
  shape = jax.typeof(x).sharding.mesh.shape
  return math.prod(shape[a] for a in (axis if isinstance(axis, tuple)
                                       else (axis,)))


def split_batch(x: jax.Array, n: int) -> jax.Array:
  """`[B, ...]` -> `[n, B // n, ...]`, the new leading axis sharded like B."""
  shape = (n, x.shape[0] // n) + x.shape[1:]
  axis = batch_axis(x)
  if axis is None:
    return x.reshape(shape)
  out = jax.typeof(x).sharding.update(spec=P(axis, *[None] * (x.ndim)))
  return jax.lax.reshape(x, shape, out_sharding=out)


def merge_batch(x: jax.Array) -> jax.Array:
  """Inverse of `split_batch`: `[n, b, ...]` -> `[n * b, ...]`."""
  return reshape_keep_batch(x, (x.shape[0] * x.shape[1],) + x.shape[2:])
