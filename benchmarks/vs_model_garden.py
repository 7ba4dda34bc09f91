"""SpineNet-49 RetinaNet, ours vs TF Model Garden's, side by side on one CPU.

  make parity-venv   # or any `make parity` run: .venv-parity has both sides
  .venv-parity/bin/python benchmarks/vs_model_garden.py [--rounds=2]

Each (case, side) runs in its own subprocess, alternating ours and Model
Garden's within a round (the order flips every round), so that both see the
same machine state. A worker builds its model (91 classes, float32, random
weights in each side's own initialisation), runs the case once (compilation
or tracing, reported as `first`), then `--iters` timed times; the summary is
the median over all timed iterations of all rounds, and the peak resident
memory of the worker process.

Cases:
  forward640  backbone + head, inference mode, 640x640, batch 1
  infer640    the same plus box decoding and NMS (Model Garden's
              MultilevelDetectionGenerator defaults vs our `detect` with the
              same thresholds), 640x640, batch 1
  train256    one training step, 256x256, batch 2
  train640    one training step, 640x640, batch 2

Training steps are each side's real RetinaNet step on the same images and
ground truth: ours is `train_lib.make_train_step` on the COCO recipe
(`configs/spinenet49_coco.py`, float32)
(targets assigned on device, focal + Huber loss, weight decay, SGD momentum);
Model Garden's is its RetinaNet task's loss (`FocalLoss` + `Huber`, each /
(positives + 1)) with L2 kernel regularisers and SGD momentum in a
`tf.function`, on targets assigned beforehand (its input pipeline's job, so
not timed). Stochastic depth is off on both sides. Our worker keeps the host
memory XLA frees, as `train.py` does (`spinenet_jax.host_memory`;
`--keep_freed_memory=0` leaves glibc's defaults), and runs under tcmalloc
where the system has it, as `train.py` does (`--malloc`: auto, tcmalloc or
glibc); Model Garden's worker runs under glibc's malloc, as its `train.py`
does (`--mg_malloc=tcmalloc` preloads tcmalloc for it too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from spinenet_jax import host_memory  # Imports neither JAX nor TensorFlow.

CASES = ('forward640', 'infer640', 'train256', 'train640')
NUM_CLASSES = 91
BOX_LOSS_WEIGHT, ALPHA, GAMMA, DELTA = 50.0, 0.25, 1.5, 0.1
WEIGHT_DECAY, LR, MOMENTUM = 4e-5, 0.01, 0.9


def _case(case: str) -> tuple[str, int, int]:
  kind, size = case[:-3], int(case[-3:])
  return kind, size, (2 if kind == 'train' else 1)


def _ground_truth(batch: int, size: int, num: int = 8,
                  num_classes: int = NUM_CLASSES, slots: int = 100):
  """Fixed random boxes (yxyx pixels) and classes, padded to `slots`."""
  rng = np.random.default_rng(0)
  boxes = np.zeros((batch, slots, 4), np.float32)
  classes = np.full((batch, slots), -1, np.int32)
  for b in range(batch):
    yx = rng.uniform(0, size * 0.7, (num, 2))
    hw = rng.uniform(size * 0.05, size * 0.3, (num, 2))
    boxes[b, :num] = np.concatenate([yx, np.minimum(yx + hw, size)], axis=1)
    classes[b, :num] = rng.integers(1, num_classes, num)
  return boxes, classes


def _images(batch: int, size: int) -> np.ndarray:
  return np.random.default_rng(1).normal(
      size=(batch, size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------- ours


def ours_program(case: str, conv_impl: str = 'auto'):
  """(jitted fn, args, advance) of our side of `case`: `fn(*args)` runs it
  once; `advance(out, args)` gives the next call's args (a train step's new
  state)."""
  kind, size, batch = _case(case)
  return build_program(kind, '49', size, batch, 'float32', conv_impl)


def build_program(kind: str, model_id: str, size: int, batch: int,
                  dtype: str = 'float32', conv_impl: str = 'auto'):
  """Our RetinaNet program `kind` ('forward', 'infer', 'train') of
  `model_id`'s COCO recipe at `size` px and global `batch` (data-parallel
  over all devices when training), as (jitted fn, args, advance)."""
  from configs import common  # pylint: disable=g-import-not-at-top

  config = common.coco_recipe(model_id, image_size=size)
  config.dtype = dtype
  config.model.stochastic_depth_rate = 0.0
  config.model.num_classes = NUM_CLASSES
  config.batch_size = batch
  config.optimizer.ema_decay = 0.0
  config.model.conv_impl = conv_impl
  return config_program(kind, config)


def config_program(kind: str, config):
  """`build_program` for any training config (its model, image size, global
  batch, loss and optimizer), on fixed random images and ground truth."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spinenet_jax import models, optim, sharding, train_lib  # pylint: disable=g-import-not-at-top
  from spinenet_jax.detection import postprocess  # pylint: disable=g-import-not-at-top

  size, batch = config.data.image_size, config.batch_size
  model = models.build_model(config)
  x = jnp.asarray(_images(batch, size))
  if kind in ('forward', 'infer'):
    variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1]))()
    anchors = model.anchors(size)

    def infer(variables, x):
      out = model.apply(variables, x, train=False)
      if kind == 'forward':
        return out
      return postprocess.detect(out['cls_outputs'], out['box_outputs'],
                                anchors, size)
    return jax.jit(infer), (variables, x), lambda out, args: args

  mesh = sharding.create_mesh(None)
  schedule = optim.learning_rate_schedule(config.optimizer, batch, 1000)
  tx = optim.create_optimizer(config.optimizer, schedule)
  boxes, classes = _ground_truth(
      batch, size, num_classes=config.model.num_classes,
      slots=max(config.data.max_instances, 8))
  with jax.set_mesh(mesh):
    state, shardings = train_lib.create_state(model, tx, config, mesh)
    step = train_lib.make_train_step(model, config, tx, schedule, shardings,
                                     mesh)
    data = sharding.global_batch(
        {'image': np.asarray(x), 'boxes': boxes, 'classes': classes,
         'is_crowd': np.zeros(classes.shape, bool)}, mesh)
  return step, (state, data), lambda out, args: (out[0], args[1])


def _ours(case: str, conv_impl: str, keep_freed_memory: bool):
  import jax  # pylint: disable=g-import-not-at-top
  if keep_freed_memory:  # As train.py does, before the backend starts.
    host_memory.keep_freed_memory()
  fn, args, advance = ours_program(case, conv_impl)
  holder = [args]

  def run():
    out = fn(*holder[0])
    jax.block_until_ready(out)
    holder[0] = advance(out, holder[0])
  return run


# ------------------------------------------------------------- Model Garden


def _write_targets(batch: int, size: int, path: str) -> None:
  """Our (Model Garden-equal) anchor targets in Model Garden's per-level
  layout (cls [B, H, W, A], box [B, H, W, A * 4], weights [B, H, W, A]) as
  an .npz, computed here so that Model Garden's worker never loads JAX."""
  import jax  # pylint: disable=g-import-not-at-top
  from spinenet_jax import models  # pylint: disable=g-import-not-at-top
  from spinenet_jax.detection import targets as targets_lib  # pylint: disable=g-import-not-at-top
  model = models.RetinaNet(model_id='49', num_classes=NUM_CLASSES)
  boxes, classes = _ground_truth(batch, size)
  flat = jax.tree.map(np.asarray, targets_lib.assign_batch(
      model.anchors(size), boxes, classes))
  out, start = {}, 0
  for level in range(3, 8):
    h = size // 2**level
    n = h * h * 9
    for k, v in flat.items():
      out[f'{k}/{level}'] = v[:, start:start + n].reshape(batch, h, h, -1)
    start += n
  np.savez(path, **out)


def _read_targets(path: str) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  with np.load(path) as f:
    for key in f.files:
      name, level = key.split('/')
      out.setdefault(name, {})[level] = f[key]
  return out


def _model_garden(case: str, targets_path: str | None):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  from official.vision.losses import focal_loss  # pylint: disable=g-import-not-at-top
  from official.vision.losses import loss_utils  # pylint: disable=g-import-not-at-top
  from official.vision.modeling import retinanet_model  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.backbones import spinenet  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.heads import dense_prediction_heads  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.layers import detection_generator  # pylint: disable=g-import-not-at-top

  kind, size, batch = _case(case)
  tf_keras.utils.set_random_seed(0)
  reg = tf_keras.regularizers.l2(WEIGHT_DECAY / 2)  # Keras l2: wd/2 * sum w^2
  backbone = spinenet.SpineNet(
      input_specs=tf_keras.layers.InputSpec(shape=[None, size, size, 3]),
      activation='swish', kernel_regularizer=reg, **spinenet.SCALING_MAP['49'])
  head = dense_prediction_heads.RetinaNetHead(
      min_level=3, max_level=7, num_classes=NUM_CLASSES,
      num_anchors_per_location=9, activation='swish', num_convs=4,
      num_filters=256, kernel_regularizer=reg)
  model = retinanet_model.RetinaNetModel(
      backbone, None, head, detection_generator.MultilevelDetectionGenerator(),
      min_level=3, max_level=7, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0],
      anchor_size=3)
  x = tf.constant(_images(batch, size))
  to_numpy = lambda out: tf.nest.map_structure(lambda t: t.numpy(), out)
  if kind == 'forward':
    fn = tf.function(lambda x: model.head(model.backbone(x, training=False),
                                          training=False))
    return lambda: to_numpy(fn(x))
  if kind == 'infer':
    fn = tf.function(lambda x: model(x, training=False))
    return lambda: to_numpy(fn(x))

  cls_loss_fn = focal_loss.FocalLoss(
      alpha=ALPHA, gamma=GAMMA, reduction=tf_keras.losses.Reduction.SUM)
  box_loss_fn = tf_keras.losses.Huber(DELTA,
                                      reduction=tf_keras.losses.Reduction.SUM)
  opt = tf_keras.optimizers.SGD(LR, momentum=MOMENTUM)
  labels = tf.nest.map_structure(tf.constant, _read_targets(targets_path))

  @tf.function
  def train(x):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      cls_w = loss_utils.multi_level_flatten(labels['cls_weights'], None)
      box_w = loss_utils.multi_level_flatten(labels['box_weights'], None)
      num_positives = tf.reduce_sum(box_w) + 1.0
      y_cls = tf.one_hot(loss_utils.multi_level_flatten(
          labels['cls_targets'], None), NUM_CLASSES)
      cls_loss = cls_loss_fn(
          y_cls, loss_utils.multi_level_flatten(out['cls_outputs'],
                                                NUM_CLASSES),
          sample_weight=cls_w / num_positives)
      box_loss = box_loss_fn(
          loss_utils.multi_level_flatten(labels['box_targets'], 4),
          loss_utils.multi_level_flatten(out['box_outputs'], 4),
          sample_weight=box_w / num_positives)
      loss = cls_loss + BOX_LOSS_WEIGHT * box_loss + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss
  return lambda: train(x).numpy()


# ------------------------------------------------------------------ driver


def _worker(side: str, case: str, iters: int, targets: str | None,
            conv_impl: str, keep_freed_memory: bool) -> None:
  run = (_ours(case, conv_impl, keep_freed_memory) if side == 'ours'
         else _model_garden(case, targets))
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  malloc = os.path.basename(host_memory.preloaded_allocator() or 'glibc')
  print('RESULT ' + json.dumps(dict(times=times, first=first, rss_mb=rss,
                                    malloc=malloc)))


def _spawn(side: str, case: str, iters: int, targets: str,
           conv_impl: str, keep_freed_memory: bool, malloc: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={side}',
         f'--cases={case}', f'--iters={iters}', f'--targets={targets}',
         f'--conv_impl={conv_impl}',
         f'--keep_freed_memory={int(keep_freed_memory)}']
  # The worker picks its malloc as train.py does (host_memory.ENV).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **{host_memory.ENV: malloc})
  env.pop('LD_PRELOAD', None)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{side} {case} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--cases', default=','.join(CASES))
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--worker', choices=('ours', 'mg'), default=None)
  p.add_argument('--targets', default=None, help='(worker) targets .npz')
  p.add_argument('--conv_impl', default='auto',
                 help="Our kxk convolution lowering (config.model.conv_impl).")
  p.add_argument('--keep_freed_memory', type=int, default=1,
                 help='1: our side keeps freed host memory as train.py does '
                 '(spinenet_jax.host_memory); 0: glibc defaults.')
  p.add_argument('--malloc', default='auto',
                 choices=host_memory.CHOICES,
                 help="Our side's malloc: auto (tcmalloc where the system has "
                 'it, as train.py does), tcmalloc, glibc.')
  p.add_argument('--mg_malloc', default='glibc',
                 choices=host_memory.CHOICES,
                 help="Model Garden's malloc (glibc: as its train.py runs).")
  p.add_argument('--sides', default='ours,mg',
                 help="'ours,mg', or one side (e.g. to compare --conv_impl).")
  args = p.parse_args()
  cases = args.cases.split(',')
  sides = tuple(args.sides.split(','))
  if args.worker:
    host_memory.run_under_tcmalloc()  # Per --malloc / --mg_malloc.
    _worker(args.worker, cases[0], args.iters, args.targets, args.conv_impl,
            bool(args.keep_freed_memory))
    return
  tmp = tempfile.mkdtemp(prefix='vs_mg_')
  targets = {}
  for case in cases:
    kind, size, batch = _case(case)
    targets[case] = os.path.join(tmp, f'{case}.npz')
    if kind == 'train':
      _write_targets(batch, size, targets[case])
  print(f'load average at start: {os.getloadavg()}', flush=True)
  results = {(c, s): [] for c in cases for s in ('ours', 'mg')}
  for r in range(args.rounds):
    for case in cases:
      for side in (sides if r % 2 == 0 else sides[::-1]):
        res = _spawn(side, case, args.iters, targets[case], args.conv_impl,
                     bool(args.keep_freed_memory),
                     args.malloc if side == 'ours' else args.mg_malloc)
        results[case, side].append(res)
        print(f'round {r} {case:10s} {side:4s} median '
              f'{statistics.median(res["times"]):7.3f} s  first '
              f'{res["first"]:6.1f} s  peak RSS {res["rss_mb"]:6.0f} MB  '
              f'malloc {res["malloc"]}', flush=True)
  print(f'\nload average at end: {os.getloadavg()}')
  if len(sides) < 2:
    return
  print('| case | ours (s) | Model Garden (s) | ours / MG | first call ours / '
        'MG (s) | peak RSS ours / MG (MB) |')
  print('|---|---|---|---|---|---|')
  for case in cases:
    med, first, rss = {}, {}, {}
    for side in ('ours', 'mg'):
      runs = results[case, side]
      med[side] = statistics.median(t for r in runs for t in r['times'])
      first[side] = statistics.median(r['first'] for r in runs)
      rss[side] = max(r['rss_mb'] for r in runs)
    print(f'| {case} | {med["ours"]:.3f} | {med["mg"]:.3f} | '
          f'{med["ours"] / med["mg"]:.2f} | {first["ours"]:.0f} / '
          f'{first["mg"]:.0f} | {rss["ours"]:.0f} / {rss["mg"]:.0f} |')


if __name__ == '__main__':
  main()
