"""Durations, learning-rate schedules and optimizers (Optax).

Durations in a config are given in steps or in epochs, resolved here at run
time against the global batch size and the training split's size, so that a
recipe keeps its meaning when `--config.batch_size` is overridden (as
big_vision's `utils.steps`). For each duration `{name}_steps` wins when set,
else `{name}_epochs` (`num_epochs` for the total) is converted; None means
unset.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

# Duration name -> (its steps field, its epochs field) in the config.
DURATIONS = {
    'total': ('total_steps', 'num_epochs'),
    'eval_every': ('eval_every_steps', 'eval_every_epochs'),
    'checkpoint_every': ('checkpoint_every_steps', 'checkpoint_every_epochs'),
}


def steps(config: ml_collections.ConfigDict, name: str,
          num_train_examples: Callable[[], int] | None = None) -> int | None:
  """Steps of the duration `name` ('total', 'eval_every', 'checkpoint_every').

  `{name}_steps` when set, else `{name}_epochs` x steps per epoch, rounded
  (at least 1 step for a positive duration); None when neither is set.
  Steps per epoch are `num_train_examples() // batch_size`, as Model Garden
  counts them (COCO at batch 256: 462), so 500 epochs are its 231000 steps.
  `num_train_examples` is called only for epochs.
  """
  steps_key, epochs_key = DURATIONS[name]
  if config[steps_key] is not None:
    return int(config[steps_key])
  epochs = config[epochs_key]
  if epochs is None:
    return None
  if num_train_examples is None:
    raise ValueError(f'config.{epochs_key}={epochs} needs the training split '
                     'size; pass num_train_examples or set '
                     f'config.{steps_key}.')
  per_epoch = num_train_examples() // config.batch_size
  if per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than '
                     f'the {num_train_examples()} training examples; set '
                     f'config.{steps_key} instead of config.{epochs_key}.')
  return max(int(round(epochs * per_epoch)), 1) if epochs > 0 else 0


def total_steps(config: ml_collections.ConfigDict,
                num_train_examples: Callable[[], int] | None = None) -> int:
  """`config.total_steps`, or `num_epochs` converted to steps."""
  total = steps(config, 'total', num_train_examples)
  if not total:
    raise ValueError('Set config.total_steps or config.num_epochs (> 0).')
  return total


def learning_rate_schedule(opt: ml_collections.ConfigDict, batch_size: int,
                           total: int) -> optax.Schedule:
  """Linear warmup, then step decay or cosine decay.

  The peak is `base_learning_rate * batch_size / 256`; step decay multiplies
  by `decay_factor` at each fraction of `total` steps in `decay_at`.
  """
  peak = opt.base_learning_rate * batch_size / 256
  warmup = min(int(opt.warmup_steps or 0), total)
  if opt.schedule == 'step':
    boundaries = {}  # Step -> factor; decays at the same step compound.
    for f in opt.decay_at:
      b = int(f * total)
      boundaries[b] = boundaries.get(b, 1.0) * opt.decay_factor
    main = optax.piecewise_constant_schedule(peak, {
        b - warmup: s for b, s in boundaries.items() if b > warmup})
  elif opt.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
  else:
    raise ValueError(f"Unknown schedule {opt.schedule!r} "
                     "(config.optimizer.schedule); expected 'step' or "
                     "'cosine'.")
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(opt.warmup_learning_rate, peak, warmup), main],
      [warmup])


def conv_kernel_mask(params: Any) -> Any:
  """True for convolution kernels (4-D 'kernel'), the only decayed params."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: path[-1].key == 'kernel' and p.ndim == 4, params)


def create_optimizer(opt: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer of `opt.name` with weight decay on conv kernels only.

  'sgd' (Model Garden's recipes): L2 on conv kernels added to the gradient
  (as Model Garden's kernel regulariser), optional global-norm clipping,
  then SGD with momentum. 'adamw': optional clipping, then Adam with
  decoupled weight decay on conv kernels (`weight_decay` times the learning
  rate), which converges faster in short runs from scratch.
  """
  clip = ([optax.clip_by_global_norm(opt.grad_clip_norm)]
          if opt.grad_clip_norm else [])
  if opt.name == 'sgd':
    decay = ([optax.add_decayed_weights(opt.weight_decay, conv_kernel_mask)]
             if opt.weight_decay else [])
    return optax.chain(*decay, *clip, optax.sgd(
        schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  if opt.name == 'adamw':
    return optax.chain(*clip, optax.adamw(
        schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=conv_kernel_mask))
  raise ValueError(f"Unknown optimizer {opt.name!r} (config.optimizer.name); "
                   "expected 'sgd' or 'adamw'.")
