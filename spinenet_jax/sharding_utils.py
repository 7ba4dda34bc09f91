"""Helpers for batch-sharded arrays under explicit-sharding meshes.

`jax.make_mesh` creates `Explicit` axes by default: reshapes of sharded
arrays need an output sharding, and `vmap` needs every mapped input sharded
the same way along the batch axis. Outside such a mesh these are no-ops.
`sharding.py` builds the meshes and shardings; these helpers keep an array's
batch sharding through reshapes inside jitted code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
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


def data_shards(xs: Sequence[jax.Array]) -> int:
  """Size of the current mesh's 'data' axis (`jax.set_mesh`) when every `xs`
  batch divides over it; else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'data' not in mesh.axis_names:
    return 1
  n = mesh.shape['data']
  return n if all(x.shape[0] % n == 0 for x in xs) else 1


def summed_param_grads(fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       xs: Sequence[jax.Array],
                       dys: Sequence[jax.Array]) -> Any:
  """Gradient of `sum_l <fn(params, xs[l]), dys[l]>` with respect to
  `params`: one weight applied to several inputs (the RetinaNet head's convs,
  shared across levels).

  Under a mesh with a 'data' axis each data shard sums its own partial
  gradients over the inputs first and the sum is reduced over 'data' once
  (other axes, such as 'model' for spatial partitioning, stay with the SPMD
  partitioner). Left to the partitioner, each input's partial gradient is
  all-reduced on its own (XLA:CPU does not reassociate
  `all-reduce(a) + all-reduce(b)`), moving the shared weight's bytes once
  per input. Without a mesh the gradients are summed as JAX would.
  """
  def local(params, xs, dys):
    total = None
    for x, dy in zip(xs, dys):
      grad = jax.vjp(lambda p, x=x: fn(p, x), params)[1](dy)[0]
      total = grad if total is None else jax.tree.map(jnp.add, total, grad)
    return total

  if data_shards(xs) == 1:
    return local(params, xs, dys)

  def per_shard(params, xs, dys):
    varying = jax.tree.map(lambda a: jax.lax.pcast(a, 'data', to='varying'),
                           params)
    return jax.tree.map(lambda g: jax.lax.psum(g, 'data'),
                        local(varying, xs, dys))
  return jax.shard_map(per_shard, in_specs=(P(), P('data'), P('data')),
                       out_specs=P(), axis_names={'data'})(
                           params, list(xs), list(dys))
