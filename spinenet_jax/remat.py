"""Rematerialisation (`config.model.remat`): what the backward pass
recomputes instead of keeping.

- 'none': every activation the backward pass needs is kept.
- 'blocks': each block's activations are recomputed from its input, so a
  step keeps one activation per block instead of about ten.
- 'full': the stem conv and max pool, the resampling connections and the
  endpoints too, so only what flows between modules is kept.

Parameter names, losses and gradients are the same in every mode (bitwise
on CPU, tests/test_pod.py), so checkpoints move between them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

MODES = ('none', 'blocks', 'full')


def check(mode: str) -> None:
  """Raises a ValueError naming `mode` unless it is one of MODES."""
  if mode not in MODES:
    raise ValueError(f'remat={mode!r} is not one of {MODES}: '
                     "'blocks' recomputes each block in the backward pass, "
                     "'full' the stem, resampling and endpoints too.")


def wrap(cls: type[nn.Module], enabled: bool,
         static_argnums: tuple[int, ...] = (2,)) -> type[nn.Module]:
  """`cls` under `nn.remat` when `enabled` (`static_argnums` count `self`
  as 0: by default `train` of `__call__(self, x, train)`), else `cls`.
  Parameter and batch-stat names do not change."""
  return nn.remat(cls, static_argnums=static_argnums) if enabled else cls


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fan_out(x: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """`n` copies of `x`, one per consumer, whose gradients are summed in the
  copies' order. Left to JAX, a feature read by three or more consumers
  sums their gradients in an order that follows how the backward pass is
  grouped, which remat changes: the gradients then differed by rounding."""
  return (x,) * n


def _fan_out_fwd(x, n):
  return (x,) * n, None


def _fan_out_bwd(n, _, cts):
  del n
  total = cts[0]
  for ct in cts[1:]:
    total = total + ct
  return (total,)


fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
  """`x`, whose gradient passes an optimization barrier: XLA cannot fuse
  the op that produces it into the backward pass of what made `x`, as a
  remat boundary already keeps it from doing. Without it, XLA:CPU reduced
  one batch-norm bias gradient of a SpineNet-Mobile block (tiny test net)
  in another order than with remat."""
  return x


def _barrier_fwd(x):
  return x, None


def _barrier_bwd(_, ct):
  return (jax.lax.optimization_barrier(ct),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)
