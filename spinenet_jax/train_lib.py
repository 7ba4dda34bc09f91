"""Training and evaluation: state, optimizer, jitted steps and the loop.

One `jax.jit` train step over a ('data', 'model') mesh: state replicated,
batch sharded on 'data' (so batch norm statistics are global), state donated.
Detection targets are assigned on device inside the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spinenet_jax import checkpoints
from spinenet_jax import evaluation
from spinenet_jax import models
from spinenet_jax import sharding
from spinenet_jax.detection import anchors as anchors_lib
from spinenet_jax.detection import losses
from spinenet_jax.detection import postprocess
from spinenet_jax.detection import targets as targets_lib

Batch = dict[str, jax.Array]


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


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def is_detection(config: ml_collections.ConfigDict) -> bool:
  return config.get('task', 'retinanet') == 'retinanet'


# ----------------------------------------------------------------- optimizer


def total_steps(config: ml_collections.ConfigDict,
                num_train_examples: Callable[[], int] | None = None) -> int:
  """`config.total_steps`, or `num_epochs` x steps per epoch when it is unset."""
  if config.get('total_steps'):
    return int(config.total_steps)
  if not config.get('num_epochs') or num_train_examples is None:
    raise ValueError('Set config.total_steps (or config.num_epochs).')
  return int(config.num_epochs * num_train_examples() // config.batch_size)


def learning_rate_schedule(opt: ml_collections.ConfigDict, batch_size: int,
                           steps: int) -> optax.Schedule:
  """Linear warmup, then step decay or cosine decay.

  The peak is `base_learning_rate * batch_size / 256`; step decay multiplies
  by `decay_factor` at each fraction of `steps` in `decay_at`.
  """
  peak = opt.base_learning_rate * batch_size / 256
  warmup = min(int(opt.get('warmup_steps', 0)), steps)
  start = opt.get('warmup_learning_rate', 0.0)
  if opt.schedule == 'step':
    boundaries = {}  # Step -> factor; decays at the same step compound.
    for f in opt.get('decay_at', ()):
      b = int(f * steps)
      boundaries[b] = boundaries.get(b, 1.0) * opt.get('decay_factor', 0.1)
    main = optax.piecewise_constant_schedule(peak, {
        b - warmup: s for b, s in boundaries.items() if b > warmup})
  elif opt.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(steps - warmup, 1))
  else:
    raise ValueError(f"Unknown schedule {opt.schedule!r}; expected 'step' or "
                     "'cosine'.")
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(start, peak, warmup), main], [warmup])


def conv_kernel_mask(params: Any) -> Any:
  """True for convolution kernels (4-D 'kernel'), the only decayed params."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: path[-1].key == 'kernel' and p.ndim == 4, params)


def create_optimizer(opt: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer of `opt.name` with weight decay on conv kernels only.

  'sgd' (the default; Model Garden's recipes): L2 on conv kernels added to
  the gradient (as Model Garden's kernel regulariser), optional global-norm
  clipping, then SGD with momentum. 'adamw': optional clipping, then Adam
  with decoupled weight decay on conv kernels (`weight_decay` times the
  learning rate), which converges faster in short runs from scratch.
  """
  name = opt.get('name', 'sgd')
  clip = ([optax.clip_by_global_norm(opt.grad_clip_norm)]
          if opt.get('grad_clip_norm') else [])
  if name == 'sgd':
    decay = ([optax.add_decayed_weights(opt.weight_decay, conv_kernel_mask)]
             if opt.get('weight_decay') else [])
    return optax.chain(*decay, *clip, optax.sgd(
        schedule, momentum=opt.get('momentum', 0.9),
        nesterov=opt.get('nesterov', False)))
  if name == 'adamw':
    return optax.chain(*clip, optax.adamw(
        schedule, b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
        eps=opt.get('eps', 1e-8), weight_decay=opt.get('weight_decay', 0.0),
        mask=conv_kernel_mask))
  raise ValueError(f"Unknown optimizer {name!r}; expected 'sgd' or 'adamw'.")


# --------------------------------------------------------------------- state


def input_shape(config: ml_collections.ConfigDict, batch: int = 1):
  s = config.data.image_size
  return (batch, s, s, 3)


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> TrainState:
  """Initial state from `config.seed` (call under `jax.jit`)."""
  variables = model.init(jax.random.key(config.seed),
                         jnp.zeros(input_shape(config)), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      ema_params=params if config.optimizer.get('ema_decay') else None)


def _replicated(abstract: Any, mesh) -> Any:
  return jax.tree.map(lambda _: sharding.replicated(mesh), abstract)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def create_state(model, tx, config, mesh) -> tuple[TrainState, Any]:
  """Creates the state directly with replicated shardings on the mesh."""
  init = lambda: init_state(model, tx, config)
  shardings = _replicated(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_state(model, tx, config, shardings) -> TrainState:
  """Shapes, dtypes and shardings of the state (a restore target)."""
  return _with_shardings(
      jax.eval_shape(lambda: init_state(model, tx, config)), shardings)


# --------------------------------------------------------------------- steps


def make_anchors(model: models.RetinaNet, image_size) -> np.ndarray:
  return anchors_lib.multilevel_anchors(image_size, **model.anchor_config())


def detection_loss(model, config, anchors, variables, batch, rng):
  outputs, updates = model.apply(
      variables, batch['image'], train=True, mutable=['batch_stats'],
      rngs={'dropout': rng})
  targets = targets_lib.assign_batch(anchors, batch['boxes'], batch['classes'],
                                     batch.get('is_crowd'))
  lc = config.get('loss', {})
  total, parts = losses.retinanet_loss(
      outputs, targets, box_loss_weight=lc.get('box_loss_weight', 50.0),
      alpha=lc.get('focal_alpha', 0.25), gamma=lc.get('focal_gamma', 1.5),
      delta=lc.get('huber_delta', 0.1))
  metrics = {'cls_loss': parts['cls_loss'], 'box_loss': parts['box_loss'],
             'num_positives': parts['num_positives']}
  return total, (metrics, updates['batch_stats'])


def classification_loss(model, config, variables, batch, rng):
  logits, updates = model.apply(
      variables, batch['image'], train=True, mutable=['batch_stats'],
      rngs={'dropout': rng})
  labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
  smoothing = config.get('loss', {}).get('label_smoothing', 0.0)
  if smoothing:
    labels = optax.smooth_labels(labels, smoothing)
  loss = optax.softmax_cross_entropy(logits, labels).mean()
  top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return loss, ({'train_top1': top1}, updates['batch_stats'])


def make_train_step(model, config, tx, schedule, state_shardings, mesh):
  """The jitted train step: (state, batch) -> (state, metrics)."""
  if is_detection(config):
    anchors = make_anchors(model, config.data.image_size)
    loss_fn = lambda *a: detection_loss(model, config, anchors, *a)
  else:
    loss_fn = lambda *a: classification_loss(model, config, *a)
  ema_decay = config.optimizer.get('ema_decay')

  def step_fn(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)

    def objective(params):
      return loss_fn({'params': params, 'batch_stats': state.batch_stats},
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
                   grad_norm=optax.tree.norm(grads))
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, ema)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_shardings,
                                        sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def make_eval_step(model, config, mesh):
  """Jitted inference: detections (detection) or correct counts (classes)."""
  ec = config.get('eval', {})
  if is_detection(config):
    anchors = make_anchors(model, config.data.image_size)

    def step_fn(variables, batch):
      out = model.apply(variables, batch['image'], train=False)
      window = jnp.round(batch['orig_size'] * batch['scale'][:, None])
      return postprocess.detect(
          out['cls_outputs'], out['box_outputs'], anchors, window,
          pre_nms_top_k=ec.get('pre_nms_top_k', 5000),
          score_threshold=ec.get('score_threshold', 0.05),
          iou_threshold=ec.get('iou_threshold', 0.5),
          max_detections=ec.get('max_detections', 100))
    out_sharding = sharding.batch_sharding(mesh)
  else:
    def step_fn(variables, batch):
      logits = model.apply(variables, batch['image'], train=False)
      mask = batch['mask'].astype(jnp.float32)
      return {'top1': jnp.sum(evaluation.topk_correct(logits, batch['label'], 1) * mask),
              'top5': jnp.sum(evaluation.topk_correct(logits, batch['label'], 5) * mask),
              'count': jnp.sum(mask)}
    out_sharding = sharding.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh),
                                        sharding.batch_sharding(mesh)),
                 out_shardings=out_sharding)


DEVICE_EVAL_KEYS = ('image', 'orig_size', 'scale', 'label', 'mask')


def evaluate(eval_step, variables, batches: Iterator[dict[str, np.ndarray]],
             config, mesh) -> dict[str, float]:
  """Runs one pass of the (process-local) eval batches; global metrics."""
  if is_detection(config):
    evaluator = evaluation.CocoEvaluator()
  totals = None
  for local in batches:
    batch = sharding.global_batch(
        {k: v for k, v in local.items() if k in DEVICE_EVAL_KEYS}, mesh)
    out = eval_step(variables, batch)
    if not is_detection(config):
      out = jax.device_get(out)
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
      continue
    det = {k: sharding.to_local(v) for k, v in out.items()}
    det['boxes'] = det['boxes'] / local['scale'][:, None, None]
    evaluator.add(det, {
        'image_id': local['image_id'], 'boxes': local['gt_boxes'],
        'classes': local['gt_classes'], 'is_crowd': local['gt_is_crowd'],
        'height': local['orig_size'][:, 0], 'width': local['orig_size'][:, 1],
    }, mask=local['mask'])
  if is_detection(config):
    return evaluator.result()
  count = max(float(totals['count']), 1.0) if totals else 1.0
  return {'top1': float(totals['top1']) / count if totals else 0.0,
          'top5': float(totals['top5']) / count if totals else 0.0}


# ------------------------------------------------------------------- logging


class MetricWriter:
  """Console, `metrics.jsonl` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      import tensorflow as tf  # Only for its event-file writer.
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    with self._tb.as_default():
      for k, v in metrics.items():
        self._tf.summary.scalar(k, float(v), step=int(step))
    self._tb.flush()

  def print(self, message: str) -> None:
    if self.active:
      print(message, flush=True)


def format_coco(metrics: dict[str, float]) -> str:
  """The COCO AP table as text."""
  rows = [('AP', 'AP @[IoU=0.50:0.95]'), ('AP50', 'AP @[IoU=0.50]'),
          ('AP75', 'AP @[IoU=0.75]'), ('APs', 'AP small'), ('APm', 'AP medium'),
          ('APl', 'AP large'), ('ARmax1', 'AR max=1'),
          ('ARmax10', 'AR max=10'), ('ARmax100', 'AR max=100'),
          ('ARs', 'AR small'), ('ARm', 'AR medium'), ('ARl', 'AR large')]
  return '\n'.join(f'  {label:<22} {metrics[k]:.3f}' for k, label in rows
                   if k in metrics)


# ---------------------------------------------------------------------- loop


class _Preemption:
  """Sets a flag on SIGTERM so the loop can checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
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


def _data_module(config):
  if is_detection(config):
    from input_pipeline import detection
    return detection
  from input_pipeline import classification
  return classification


def _check_finite(metrics: dict[str, Any], step: int) -> None:
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'Loss became {loss} at step {step}; stopping without saving. The '
        'last good checkpoint (if any) is kept in the workdir. Lower the '
        'learning rate or enable config.optimizer.grad_clip_norm.')


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a collective)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(
      np.array([flag], np.int32))))


def _wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of the distributed runtime (not a device collective)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:  # Not expected after jax.distributed.initialize.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def _compile_then_sync(fn, *args):
  """Compiles the jitted `fn` for `args`, then waits for every process.

  Processes can finish compiling far apart (one hits the persistent
  compilation cache, another compiles). CPU (gloo) collectives give up when
  peers reach their first collective about 30 s apart, so the step is
  compiled ahead and the processes start it together.
  """
  compiled = fn.lower(*args).compile()
  _wait_for_all_processes(f'spinenet_jax_compiled_{fn.__name__}')
  return compiled


def _every(step: int, n: int | None) -> bool:
  """Whether `step` is a multiple of `n` (never when `n` is 0 or None)."""
  return bool(n) and step % n == 0


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  Returns the final evaluation metrics and the final step (with
  'preempted': True, and no evaluation, when SIGTERM stopped the run after
  saving a checkpoint).

  Raises:
    NonFiniteLossError: when the loss becomes NaN or infinite; checkpoints
      saved before that step are kept.
  """
  import input_pipeline  # Kept out of module import: TF is heavy.
  data = _data_module(config)
  mesh = sharding.create_mesh(config.get('mesh'))
  sharding.check_batch_size(config.batch_size, mesh)
  model = models.build_model(config)
  steps = total_steps(config, lambda: input_pipeline.num_examples(
      config.data, config.data.train_split))
  schedule = learning_rate_schedule(config.optimizer, config.batch_size, steps)
  tx = create_optimizer(config.optimizer, schedule)
  writer = MetricWriter(workdir)
  checkpoints.save_config(workdir, config)
  manager = checkpoints.create_manager(
      workdir, config.get('keep_checkpoints', 3),
      config.get('async_checkpoints', True))

  try:
    with _Preemption() as preempt:
      return _train_loop(config, data, mesh, model, steps, schedule, tx,
                         writer, manager, preempt)
  finally:
    manager.wait_until_finished()
    manager.close()


def _initial_state(model, tx, config, mesh, manager, writer):
  """The latest checkpoint's state, else a fresh one; and its shardings.

  A resumed run restores straight onto the current mesh's shardings without
  initialising (and compiling the initialiser) first.
  """
  if manager.latest_step() is None:
    return create_state(model, tx, config, mesh)
  abstract = jax.eval_shape(lambda: init_state(model, tx, config))
  shardings = _replicated(abstract, mesh)
  state = checkpoints.restore(manager, _with_shardings(abstract, shardings))
  writer.print(f'Resumed from {manager.directory}/{manager.latest_step()}.')
  return state, shardings


def _train_loop(config, data, mesh, model, steps, schedule, tx, writer,
                manager, preempt):
  t0 = time.time()
  with jax.set_mesh(mesh):
    state, shardings = _initial_state(model, tx, config, mesh, manager,
                                      writer)
    start = int(state.step)
    train_step = make_train_step(model, config, tx, schedule, shardings, mesh)
    eval_step = make_eval_step(model, config, mesh)
    train_iter = data.train_iterator(
        config.data, batch_size=config.batch_size, seed=config.seed,
        start_step=start)

    def run_eval(step):
      batches = data.eval_iterator(
          config.data,
          batch_size=config.get('eval_batch_size') or config.batch_size)
      t = time.time()
      metrics = evaluate(eval_step, state.eval_variables(), batches, config,
                         mesh)
      writer.write(step, metrics)
      writer.print(f'Evaluation at step {step} ({time.time() - t:.0f} s):')
      writer.print(format_coco(metrics) if is_detection(config) else
                   f'  top-1 {metrics["top1"]:.4f}  top-5 {metrics["top5"]:.4f}')
      return metrics

    eval_metrics, pending, acc = {}, None, []
    # Throughput is timed from the end of the first step (compilation).
    tick, done_at_tick = None, start
    log_every = config.get('log_every_steps', 50)
    ckpt_every = config.get('checkpoint_every_steps', 1000)
    multi = jax.process_count() > 1
    step, batch = start, None
    if step < steps:
      batch = sharding.global_batch(next(train_iter), mesh)
      train_step = _compile_then_sync(train_step, state, batch)
    while step < steps:
      if batch is None:
        batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      batch = None
      if pending is not None:  # Check the previous step while this one runs.
        _check_finite(pending, step)
        acc.append(pending)
      pending = metrics
      step += 1
      if tick is None:
        jax.block_until_ready(metrics)
        tick, done_at_tick = time.time(), step
      log_now = _every(step, log_every) or step == steps
      # Processes agree on a SIGTERM where they block anyway (log steps), so
      # that all of them save the same step; one process acts at once.
      stop = (_any_process(preempt.requested) if multi and log_now
              else preempt.requested and not multi)
      save_now = _every(step, ckpt_every) or step == steps or stop
      if log_now or save_now:
        _check_finite(pending, step)
        acc.append(pending)
        pending = None
      if log_now and acc:
        means = {k: float(np.mean([float(m[k]) for m in acc]))
                 for k in acc[0]}
        acc = []
        now = time.time()
        speed = ''
        if step > done_at_tick:
          rate = (step - done_at_tick) * config.batch_size / (now - tick)
          eta = (steps - step) * config.batch_size / rate
          means['examples_per_sec'] = rate
          speed = f' {rate:.1f} ex/s ETA {eta / 60:.1f} min'
        writer.write(step, means)
        parts = ' '.join(f'{k}={v:.4f}' for k, v in means.items()
                         if k not in ('learning_rate', 'num_positives',
                                      'examples_per_sec'))
        writer.print(f'step {step}/{steps} {parts} '
                     f'lr={means["learning_rate"]:.4g}{speed}')
        tick, done_at_tick = now, step
      if save_now:
        checkpoints.save(manager, step, state, force=True)
      if stop:
        manager.wait_until_finished()
        writer.print(f'SIGTERM: saved step {step} and stopped.')
        return {'step': step, 'preempted': True}
      if (_every(step, config.get('eval_every_steps')) and step < steps):
        eval_metrics = run_eval(step)
    if start < steps or not eval_metrics:
      eval_metrics = run_eval(steps)
  writer.print(f'Done: {steps} steps in {time.time() - t0:.0f} s.')
  return {'step': steps, **eval_metrics}
