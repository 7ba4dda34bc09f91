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


def model_shards(xs: Sequence[jax.Array], halo: int) -> int:
  """Size of the current mesh's 'model' axis (spatial partitioning) when
  every `xs` height splits over it into shards of at least `halo` rows;
  else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'model' not in mesh.axis_names:
    return 1
  k = mesh.shape['model']
  fits = all(x.shape[1] % k == 0 and x.shape[1] // k >= max(halo, 1)
             for x in xs)
  return k if fits else 1


def _with_halo(x: jax.Array, halo: int, k: int) -> jax.Array:
  """Inside a shard_map manual over 'model' (the height split k ways): this
  shard's rows with `halo` rows of each neighbour above and below, zeros
  past the image's edges (what a 'SAME' convolution pads with)."""
  if halo == 0:
    return x
  down = [(i, i + 1) for i in range(k - 1)]  # Shard i's last rows to i + 1.
  up = [(i + 1, i) for i in range(k - 1)]
  above = jax.lax.ppermute(x[:, -halo:], 'model', down)
  below = jax.lax.ppermute(x[:, :halo], 'model', up)
  return jnp.concatenate([above, x, below], axis=1)


def summed_param_grads(fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       xs: Sequence[jax.Array], dys: Sequence[jax.Array],
                       halo: int = 0) -> Any:
  """Gradient of `sum_l <fn(params, xs[l]), dys[l]>` with respect to
  `params`: one weight applied to several inputs (the RetinaNet head's convs,
  shared across levels). `fn` maps NHWC to NHWC, each output row reading
  the input rows within `halo` of it (a stride-1 'SAME' convolution of
  kernel 2 * halo + 1).

  Under a mesh each device sums its own partial gradients over the inputs
  first and the sum is reduced once, over 'data' and, when the heights are
  split over 'model' (spatial partitioning), over 'model' too: each device
  takes `halo` rows from its neighbours (`ppermute`) and differentiates
  `fn` on its own rows. Left to the SPMD partitioner, each input's partial
  gradient is all-reduced on its own (XLA:CPU does not reassociate
  `all-reduce(a) + all-reduce(b)`), moving the shared weight's bytes once
  per input and axis. Without a mesh the gradients are summed as JAX would.
  """
  def local(params, xs, dys, k=1):
    total = None
    for x, dy in zip(xs, dys):
      if k > 1:
        x = _with_halo(x, halo, k)
        f = lambda p, x=x: fn(p, x)[:, halo:x.shape[1] - halo]
      else:
        f = lambda p, x=x: fn(p, x)
      grad = jax.vjp(f, params)[1](dy)[0]
      total = grad if total is None else jax.tree.map(jnp.add, total, grad)
    return total

  k = model_shards(xs, halo)
  axes = tuple(a for a, n in (('data', data_shards(xs)), ('model', k))
               if n > 1)
  if not axes:
    return local(params, xs, dys)

  def per_shard(params, xs, dys):
    varying = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to='varying'),
                           params)
    return jax.tree.map(lambda g: jax.lax.psum(g, axes),
                        local(varying, xs, dys, k))
  spec = P(*(a if a in axes else None for a in ('data', 'model')))
  return jax.shard_map(per_shard, in_specs=(P(), spec, spec),
                       out_specs=P(), axis_names=set(axes))(
                           params, list(xs), list(dys))
