"""The NaN guard: what became non-finite first, and the rollback policy.

Every train step returns, beside its loss parts, the gradient norm of each
parameter group (a module two levels down, e.g. `backbone/block3_0`,
`head/class_predict`) and the number of non-finite input pixels. When the
loss or the gradient norm is not finite, `first_nonfinite` names the first
non-finite quantity in causal order: the input batch, then the loss parts,
then the gradient groups.

`config.nan_policy`: 'stop' (default) raises `NonFiniteLossError` and keeps
the checkpoints saved so far; 'rollback' restores the last checkpoint and
continues with the learning rate halved, at most `config.nan_max_rollbacks`
times (then stops as 'stop' does).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

POLICIES = ('stop', 'rollback')
GRAD_PREFIX = 'grad_norm/'
INPUT_KEY = 'input/nonfinite_pixels'


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or gradient."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _group_name(path) -> str:
  names = [str(getattr(k, 'key', k)) for k in path[:2]]
  return '/'.join(names)


def group_norms(grads: Any) -> dict[str, jax.Array]:
  """'grad_norm/<module>/<submodule>' -> the L2 norm of its gradients."""
  squares: dict[str, jax.Array] = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = GRAD_PREFIX + _group_name(path)
    squares[name] = squares.get(name, 0.0) + jnp.sum(jnp.square(g))
  return {k: jnp.sqrt(v) for k, v in squares.items()}


def diagnostics(grads: Any, images: jax.Array) -> dict[str, jax.Array]:
  """The step's per-group gradient norms, the total norm and the count of
  non-finite input pixels (cheap reductions, computed in every step)."""
  norms = group_norms(grads)
  total = jnp.sqrt(sum(jnp.square(v) for v in norms.values()))
  return {**norms, 'grad_norm': total,
          INPUT_KEY: jnp.sum(~jnp.isfinite(images)).astype(jnp.int32)}


def is_finite(metrics: dict[str, Any]) -> bool:
  return (math.isfinite(float(metrics['loss'])) and
          math.isfinite(float(metrics['grad_norm'])))


def first_nonfinite(metrics: dict[str, Any]) -> str:
  """The first non-finite quantity of a step's metrics, in words."""
  bad_pixels = int(metrics.get(INPUT_KEY, 0))
  if bad_pixels:
    return f'the input batch ({bad_pixels} non-finite pixels)'
  parts = [k for k in metrics if k.endswith('_loss')] + ['loss']
  for k in parts:
    if not math.isfinite(float(metrics[k])):
      return f'the loss part {k} ({float(metrics[k])})'
  for k in sorted(k for k in metrics if k.startswith(GRAD_PREFIX)):
    if not math.isfinite(float(metrics[k])):
      return (f'the gradient of the {k[len(GRAD_PREFIX):]} parameters '
              f'(norm {float(metrics[k])})')
  return f'the gradient norm ({float(metrics["grad_norm"])})'


def check(metrics: dict[str, Any], step: int, last_checkpoint: int | None
          ) -> None:
  """Raises NonFiniteLossError naming the step and the first non-finite
  quantity, and the checkpoint that is kept."""
  if is_finite(metrics):
    return
  loss = float(metrics['loss'])
  what = ('Loss' if not math.isfinite(loss) else 'The gradient norm')
  value = loss if not math.isfinite(loss) else float(metrics['grad_norm'])
  kept = (f'the last good checkpoint, step {last_checkpoint}, is kept'
          if last_checkpoint is not None else 'no checkpoint was saved yet')
  raise NonFiniteLossError(
      f'{what} became {value} at step {step}; first non-finite: '
      f'{first_nonfinite(metrics)}. Stopped without saving; {kept}. Lower '
      'the learning rate, set config.optimizer.grad_clip_norm, or set '
      "config.nan_policy='rollback'.", step)


def is_diagnostic(key: str) -> bool:
  """Keys that are kept per step for the guard but not logged as means."""
  return key.startswith(GRAD_PREFIX) or key == INPUT_KEY
