"""Training: the train state, the jitted steps and the loop.

One `jax.jit` train step over a ('data', 'model') mesh: state replicated,
batch sharded on 'data' (so batch norm statistics are global), state donated.
What depends on the task (loss, evaluation, input pipeline) comes from
`tasks.get_task`; optimizer, schedule and durations from `optim`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from input_pipeline import common as data_common
from input_pipeline import sources
from spinenet_jax import checkpoints
from spinenet_jax import config_checks
from spinenet_jax import finetune
from spinenet_jax import inference
from spinenet_jax import models
from spinenet_jax import multihost
from spinenet_jax import nonfinite
from spinenet_jax import optim
from spinenet_jax import sharding
from spinenet_jax import tasks
from spinenet_jax import workdir_lock
from spinenet_jax.metric_writer import MetricWriter

Batch = dict[str, jax.Array]


NonFiniteLossError = nonfinite.NonFiniteLossError


# --------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None  # Exponential moving average, when configured.

  def eval_variables(self) -> dict[str, Any]:
    params = self.params if self.ema_params is None else self.ema_params
    return {'params': params, 'batch_stats': self.batch_stats}


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> TrainState:
  """Initial state from `config.seed` (call under `jax.jit`)."""
  s = config.data.image_size
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, s, s, 3)),
                         train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      ema_params=params if config.optimizer.ema_decay else None)


def replicated_shardings(abstract: Any, mesh) -> Any:
  """A replicated sharding on `mesh` for every leaf of `abstract`."""
  return jax.tree.map(lambda _: sharding.replicated(mesh), abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings`."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def create_state(model, tx, config, mesh) -> tuple[TrainState, Any]:
  """Creates the state directly with replicated shardings on the mesh."""
  init = lambda: init_state(model, tx, config)
  shardings = replicated_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_state(model, tx, config, shardings) -> TrainState:
  """Shapes, dtypes and shardings of the state (a restore target)."""
  return with_shardings(
      jax.eval_shape(lambda: init_state(model, tx, config)), shardings)


def initial_state(model, tx, config, mesh, manager, warn=print,
                  hint: str = '') -> tuple[TrainState, Any, int | None]:
  """The newest checkpoint that restores, else a fresh state; its shardings;
  the step resumed from (None for a fresh state).

  A resumed run restores straight onto the current mesh's shardings without
  initialising (and compiling the initialiser) first. Damaged checkpoints
  newer than the one restored are moved aside (`checkpoints.
  restore_newest_good`); `hint` is added to a config-mismatch error.
  """
  abstract = jax.eval_shape(lambda: init_state(model, tx, config))
  shardings = replicated_shardings(abstract, mesh)
  state, step = checkpoints.restore_newest_good(
      manager, with_shardings(abstract, shardings), warn, hint)
  if state is None:  # A first start: from config.init_from if set.
    state, shardings = create_state(model, tx, config, mesh)
    return finetune.initialise(state, config, tx, shardings, warn), \
        shardings, None
  return state, shardings, step


# --------------------------------------------------------------------- steps


def make_train_step(model, config, tx, schedule, state_shardings, mesh):
  """The jitted train step: (state, batch) -> (state, metrics)."""
  task = tasks.get_task(config, model)
  ema_decay = config.optimizer.ema_decay

  def step_fn(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)
    batch = sharding.partition_images(batch, mesh)

    def objective(params):
      return task.loss({'params': params, 'batch_stats': state.batch_stats},
                       batch, rng)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                         ema, params)
    metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step),
                   **nonfinite.diagnostics(grads, batch['image']))
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, ema)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_shardings,
                                        sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0,
                 compiler_options=compiler_options(
                     mesh.devices.flat[0].platform))


def compiler_options(platform: str) -> dict[str, str]:
  """XLA options for a train step on `platform`.

  XLA:CPU's default scheduler orders a program for concurrency: it runs each
  op as soon as its inputs exist, so many activations (and, with remat, every
  recomputation) are live at once. Scheduled for memory instead, the demo's
  step is 8-12% faster with 31% fewer temporaries, and remat saves what it
  should on one device (SpineNet-49@640 'full': 1.77 -> 0.83 GiB). The
  schedule changes no result: steps are bitwise equal (tests/test_pod.py).
  GPU and TPU keep the compiler's defaults.
  """
  if platform != 'cpu':
    return {}
  return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def make_eval_step(model, config, mesh):
  """The task's jitted eval step: (variables, batch) -> outputs."""
  task = tasks.get_task(config, model)
  out = (sharding.batch_sharding(mesh) if task.eval_outputs_batched
         else sharding.replicated(mesh))
  eval_step = lambda variables, batch: task.eval_step(
      variables, sharding.partition_images(batch, mesh))
  return jax.jit(eval_step, in_shardings=(sharding.replicated(mesh),
                                               sharding.batch_sharding(mesh)),
                 out_shardings=out)


# -------------------------------------------------------------- loop helpers


class Preemption:
  """Sets `requested` on SIGTERM so the loop can checkpoint and exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'Preemption':
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some test runners).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Throughput:
  """Examples per second and time left, measured between log steps."""

  def __init__(self, batch_size: int, total: int):
    self.batch_size, self.total = batch_size, total
    self._time, self._step = None, None

  def start(self, step: int) -> None:
    self._time, self._step = time.time(), step

  def lap(self, step: int) -> tuple[float, float] | None:
    """(examples/s, seconds left) since the last lap or start, if any steps."""
    now, last_time, last_step = time.time(), self._time, self._step
    self.start(step)
    if step <= last_step:
      return None
    rate = (step - last_step) * self.batch_size / (now - last_time)
    return rate, (self.total - step) * self.batch_size / rate


def itstime(step: int, every: int | None, total: int | None = None) -> bool:
  """A periodic action's turn: every `every` steps (never for 0 or None),
  and at the last step `total` when given."""
  return (bool(every) and step % every == 0) or step == total


def _log_line(step: int, total: int, means: dict[str, float]) -> str:
  parts = ' '.join(f'{k}={v:.4f}' for k, v in means.items()
                   if k not in ('learning_rate', 'num_positives',
                                'examples_per_sec'))
  return f'step {step}/{total} {parts} lr={means["learning_rate"]:.4g}'


def data_metrics(iterator: Any, prefix: str) -> dict[str, int]:
  """`<prefix>/<kind>`: the iterator's nonzero counts of malformed records
  so far (input_pipeline/sanitize.py), summed over processes (a
  collective); {} for iterators that do not count."""
  if not hasattr(iterator, 'data_problems'):
    return {}
  counts = iterator.data_problems()
  totals = multihost.sum_over_processes(list(counts.values()))
  return {f'{prefix}/{k}': int(n) for k, n in zip(counts, totals) if n}


# ---------------------------------------------------------------------- loop


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the training loop needs that does not change between attempts."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: nn.Module
  task: Any
  total: int
  eval_every: int | None
  checkpoint_every: int | None
  writer: MetricWriter
  manager: Any


def _train(run: _Run, preempt: Preemption, lr_scale: float) -> dict[str, Any]:
  """From the newest good checkpoint (or a fresh state) to the last step and
  the final evaluation, with the learning rate scaled by `lr_scale`."""
  config, writer, manager, total = run.config, run.writer, run.manager, run.total
  mesh, model, task = run.mesh, run.model, run.task
  multi = jax.process_count() > 1
  base_schedule = optim.learning_rate_schedule(config.optimizer,
                                               config.batch_size, total)
  schedule = base_schedule if lr_scale == 1 else (
      lambda step: lr_scale * base_schedule(step))
  tx = optim.create_optimizer(config.optimizer, schedule)
  # ----------------------------------- state: newest good checkpoint or fresh
  state, shardings, resumed = initial_state(
      model, tx, config, mesh, manager, writer.print,
      checkpoints.config_difference(run.workdir, config))
  checkpoints.save_config(run.workdir, config)  # Once the state fits it.
  inference.save_label_map(run.workdir, config)
  if resumed is not None:
    writer.print(f'Resumed from {manager.directory}/{resumed}.')
  start = int(state.step)

  # ----------------------------------------------- steps and input data
  train_step = make_train_step(model, config, tx, schedule, shardings, mesh)
  eval_step = make_eval_step(model, config, mesh)
  train_iter = task.data.train_iterator(
      config.data, batch_size=config.batch_size, seed=config.seed,
      start_step=start)
  next_batch = lambda: sharding.global_batch(next(train_iter), mesh)

  def run_eval(step: int) -> dict[str, float]:
    t = time.time()
    batches = task.data.eval_iterator(
        config.data, batch_size=config.eval_batch_size or config.batch_size)
    metrics = task.evaluate(
        eval_step, state.eval_variables(), batches, mesh,
        os.path.join(run.workdir, f'detections_{step}.json'),
        lambda images: writer.images(step, 'eval/truth_vs_predicted', images))
    writer.write(step, {**metrics, **data_metrics(batches, 'eval_data')})
    writer.print(f'Evaluation at step {step} ({time.time() - t:.0f} s):')
    writer.print(task.report(metrics))
    return metrics

  # Compiled ahead, so that all processes start stepping together.
  batch = None
  if start < total:
    batch = next_batch()
    t = time.time()
    train_step = multihost.compile_then_sync(train_step, state, batch)
    writer.print(f'Compiled the train step in {time.time() - t:.1f} s.')

  # ------------------------------------------------------------ training
  timer = Throughput(config.batch_size, total)
  done, pending = [], None  # Checked step metrics; the unchecked last.
  check = lambda m, step: nonfinite.check(m, step, manager.latest_step())
  for step in range(start + 1, total + 1):
    state, metrics = train_step(state, next_batch() if batch is None
                                else batch)
    batch = None
    if pending is not None:  # The previous step's, while this one runs.
      check(pending, step - 1)
      done.append(pending)
    pending = metrics
    if step == start + 1:  # Throughput is timed after compilation.
      jax.block_until_ready(metrics)
      timer.start(step)

    log_now = itstime(step, config.log_every_steps, total)
    # Processes agree on a SIGTERM where they block anyway (log steps), so
    # that all of them save the same step; one process acts at once.
    stop = (multihost.any_process(preempt.requested) if multi and log_now
            else preempt.requested and not multi)
    save_now = itstime(step, run.checkpoint_every, total) or stop
    if log_now or save_now:
      check(pending, step)
      done.append(pending)
      pending = None
    if log_now:
      means = {k: float(np.mean([float(m[k]) for m in done]))
               for k in done[0] if not nonfinite.is_diagnostic(k)}
      done, speed = [], ''
      lap = timer.lap(step)
      if lap is not None:
        means['examples_per_sec'] = lap[0]
        speed = f' {lap[0]:.1f} ex/s ETA {lap[1] / 60:.1f} min'
      writer.write(step, {**means, **data_metrics(train_iter, 'data')})
      writer.print(_log_line(step, total, means) + speed)
    if save_now:
      checkpoints.save(manager, step, state, force=True)
    if stop:
      manager.wait_until_finished()
      writer.print(f'SIGTERM: saved step {step} and stopped.')
      return {'step': step, 'preempted': True}
    if itstime(step, run.eval_every) and step < total:
      run_eval(step)

  # ---------------------------------------------------- final evaluation
  return {'step': total, **run_eval(total)}


def _rollback_or_raise(run: _Run, error: NonFiniteLossError, rollbacks: int,
                       lr_scale: float) -> float:
  """The halved learning-rate scale to continue with after `error`, or
  re-raises it when the policy or the rollback limit says stop."""
  config = run.config
  if config.nan_policy != 'rollback' or rollbacks >= config.nan_max_rollbacks:
    if config.nan_policy == 'rollback':
      run.writer.print(f'Stopping: {rollbacks} rollbacks, the limit '
                       '(config.nan_max_rollbacks).')
    raise error
  run.manager.wait_until_finished()
  last = run.manager.latest_step()
  scale = lr_scale / 2
  run.writer.print(f'{error}\nRollback {rollbacks + 1} of '
                   f'{config.nan_max_rollbacks}: continuing from '
                   f'{"step " + str(last) if last is not None else "scratch"} '
                   f'with the learning rate x{scale:g}.')
  run.writer.write(error.step, {'nan_rollbacks': rollbacks + 1,
                                'learning_rate_scale': scale})
  return scale


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest good checkpoint in `workdir`) and
  evaluates.

  Returns the final evaluation metrics and the final step (with
  'preempted': True, and no evaluation, when SIGTERM stopped the run after
  saving a checkpoint).

  Raises:
    config_checks.ConfigError: the config cannot train (before anything is
      built or compiled).
    NonFiniteLossError: when the loss or gradient becomes NaN or infinite
      (after `config.nan_max_rollbacks` rollbacks with nan_policy
      'rollback'); checkpoints saved before that step are kept.
    workdir_lock.WorkdirLockedError: another trainer holds `workdir`.
    checkpoints.CheckpointError: no checkpoint restores, or they belong to
      another configuration.
  """
  t0 = time.time()
  # ----------------------------------------------------------- set-up
  try:  # Prepares the user's data on first use.
    config = sources.resolve_num_classes(config)
  except (ValueError, FileNotFoundError) as e:
    raise config_checks.ConfigError(str(e)) from e
  config_checks.validate(config)
  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  model = models.build_model(config)
  num_train = functools.cache(lambda: data_common.num_examples(
      config.data, config.data.train_split))
  total = optim.total_steps(config, num_train)
  with workdir_lock.WorkdirLock(workdir):
    writer = MetricWriter(workdir)
    manager = checkpoints.create_manager(workdir, config.keep_checkpoints,
                                         config.async_checkpoints)
    run = _Run(config, workdir, mesh, model, tasks.get_task(config, model),
               total, optim.steps(config, 'eval_every', num_train),
               optim.steps(config, 'checkpoint_every', num_train), writer,
               manager)
    try:
      with Preemption() as preempt, jax.set_mesh(mesh):
        lr_scale, rollbacks = 1.0, 0
        while True:
          try:
            result = _train(run, preempt, lr_scale)
            break
          except NonFiniteLossError as e:
            lr_scale = _rollback_or_raise(run, e, rollbacks, lr_scale)
            rollbacks += 1
    finally:
      manager.wait_until_finished()
      manager.close()
  if not result.get('preempted'):
    writer.print(f'Done: {total} steps in {time.time() - t0:.0f} s.')
  return result
