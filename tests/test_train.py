"""Training: the loss goes down, the sharded step is exact, every config runs,
runs resume exactly after SIGTERM and SIGKILL, checkpoints move between
device counts, two processes equal one, and a non-finite loss stops a run.

XLA compilation dominates the cost, so the tests share the tiny
configurations of tiny.py (the same shapes and schedule, hence the same
executables), the session's datasets and runs (conftest.py), and its
persistent compilation cache, which the `train.py` subprocesses read too.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from spinenet_jax import checkpoints
from spinenet_jax import models
from spinenet_jax import optim
from spinenet_jax import sharding
from spinenet_jax import specs
from spinenet_jax import tasks
from spinenet_jax import train_lib
from tests.tiny import cli_overrides
from tests.tiny import load_config
from tests.tiny import run_in_process
from tests.tiny import REPO
from tests.tiny import TINY_BACKBONE
from tests.tiny import TINY_CLASSIFICATION_DATA
from tests.tiny import TINY_DATA
from tests.tiny import TINY_DEMO
from tests.tiny import TINY_HEAD
from tests.tiny import TINY_MOBILE_SPECS

CONFIG_NAMES = sorted(  # Training configs (search configs hold one).
    p.stem for p in (REPO / 'configs').glob('*.py')
    if p.stem not in ('common', '__init__') and not p.stem.startswith(
        'search_'))
# Only a process that has run this long is stuck rather than slow.
SUBPROCESS_TIMEOUT_S = 900


# --------------------------------------------------------------- helpers


def read_metrics(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # A line being written by a live run.
        pass
  return records


def train_losses(workdir) -> dict[int, float]:
  """Step -> logged training loss (the last one logged for the step)."""
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def _flat(tree) -> dict[str, np.ndarray]:
  """Leaves by path, with attribute, key and index steps alike (a restored
  checkpoint has dicts where the state has dataclasses and named tuples)."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {'/'.join(name(k) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees(actual, expected, rtol=0.0, atol=0.0):
  """Equal (bitwise by default) leaves at the same paths."""
  flat_a, flat_e = _flat(actual), _flat(expected)
  assert sorted(flat_a) == sorted(flat_e)
  assert flat_a
  for name, e in flat_e.items():
    a = flat_a[name]
    assert a.shape == e.shape and a.dtype == e.dtype, name
    if rtol == 0 and atol == 0:
      np.testing.assert_array_equal(a, e, err_msg=name)
    else:
      np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=name)


def assert_same_final_state(workdir, reference_workdir, step,
                            tolerances=None):
  """The checkpoints at `step` hold equal states (bitwise by default).

  `tolerances` maps 'params', 'batch_stats', 'opt_state' to assert_allclose
  keyword arguments.
  """
  got = checkpoints.restore_arrays(workdir, step)
  want = checkpoints.restore_arrays(reference_workdir, step)
  assert int(got['step']) == int(want['step']) == step
  for key in ('params', 'batch_stats', 'opt_state'):
    assert_trees(got[key], want[key], **(tolerances or {}).get(key, {}))


class Train:
  """A `train.py` subprocess; its output goes to a log file."""

  def __init__(self, workdir, overrides, data_dir, cache_dir, *args,
               name='train'):
    self.log_path = Path(workdir).parent / f'{Path(workdir).name}.{name}.log'
    cmd = [sys.executable, str(REPO / 'train.py'),
           f'--config={REPO / "configs" / "demo.py"}', f'--workdir={workdir}',
           *cli_overrides({**overrides, 'data.data_dir': data_dir}), *args]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='',
               JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    with open(self.log_path, 'w') as log:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    self.deadline = time.time() + SUBPROCESS_TIMEOUT_S

  @property
  def log(self) -> str:
    return self.log_path.read_text()

  def wait(self) -> int:
    try:
      return self.proc.wait(max(self.deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f'train.py timed out; log:\n{self.log[-5000:]}')

  def wait_for(self, condition, what: str) -> None:
    while not condition():
      if self.proc.poll() is not None:
        pytest.fail(f'train.py exited ({self.proc.returncode}) before '
                    f'{what}; log:\n{self.log[-5000:]}')
      if time.time() > self.deadline:
        self.proc.kill()
        pytest.fail(f'timed out waiting for {what}; log:\n{self.log[-5000:]}')
      time.sleep(0.1)

  def assert_ok(self) -> str:
    rc = self.wait()
    assert rc == 0, f'train.py exited with {rc}; log:\n{self.log[-5000:]}'
    return self.log


def resumed_from(log: str) -> int:
  m = re.search(r'Resumed from \S+/(\d+)\.', log)
  assert m, f'no "Resumed from" line in:\n{log[-3000:]}'
  return int(m.group(1))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ------------------------------------------------------- in-process tests


def test_demo_loss_decreases_and_logs(det_reference):
  reference = det_reference
  losses = train_losses(reference.workdir)
  assert sorted(losses) == list(range(1, 13))
  first = np.mean([losses[s] for s in (1, 2, 3)])
  last = np.mean([losses[s] for s in (10, 11, 12)])
  assert last < 0.95 * first, losses

  # Console: a line per log step with the losses, learning rate, throughput
  # and ETA (none for step 1: the first step's time is compilation).
  out = reference.stdout
  assert re.search(r'^step 1/12 box_loss=\S+ cls_loss=\S+ grad_norm=\S+ '
                   r'loss=\S+ lr=0$', out, re.M), out
  assert re.search(r'^step 12/12 .*loss=[\d.]+ lr=\S+ [\d.]+ ex/s '
                   r'ETA [\d.]+ min$', out, re.M), out
  assert 'Evaluation at step 12' in out and 'AP @[IoU=0.50:0.95]' in out
  assert reference.result['step'] == 12 and 'AP' in reference.result

  records = read_metrics(reference.workdir)
  assert all('examples_per_sec' in r for r in records
             if 'loss' in r and r['step'] > 1)
  assert any('AP' in r and r['step'] == 12 for r in records)
  assert checkpoints.saved_steps(reference.workdir) == [4, 8, 12]
  saved = checkpoints.load_config(reference.workdir)
  assert saved.total_steps == 12 and saved.model.head_num_filters == 16

  # TensorBoard event files with the training and evaluation scalars.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = glob.glob(os.path.join(reference.workdir, 'tb', 'events.*'))
  assert events
  tags = {v.tag for path in events
          for e in tf.compat.v1.train.summary_iterator(path)
          for v in e.summary.value}
  assert {'loss', 'cls_loss', 'box_loss', 'learning_rate', 'AP'} <= tags


def test_classification_loss_decreases(cls_reference):
  run = cls_reference
  losses = train_losses(run.workdir)
  assert sorted(losses) == list(range(1, 21))
  first = np.mean([losses[s] for s in range(1, 6)])
  last = np.mean([losses[s] for s in range(16, 21)])
  assert last < first - 0.02, losses
  assert 0 <= run.result['top1'] <= run.result['top5'] <= 1
  assert 'top-1' in run.stdout
  assert checkpoints.saved_steps(run.workdir) == [20]


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_optimizer_decays_only_conv_kernels(name):
  """With a zero gradient, only the 4-D conv kernel moves (weight decay)."""
  opt = load_config('demo', {'optimizer.name': name,
                             'optimizer.weight_decay': 0.1}).optimizer
  tx = optim.create_optimizer(opt, lambda step: 0.5)
  params = {'conv': {'kernel': np.ones((3, 3, 2, 2), np.float32)},
            'dense': {'kernel': np.ones((2, 2), np.float32)},
            'norm': {'scale': np.ones((2,), np.float32)}}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.all(np.asarray(updates['conv']['kernel']) < 0)
  assert not np.any(np.asarray(updates['dense']['kernel']))
  assert not np.any(np.asarray(updates['norm']['scale']))


def test_unknown_optimizer_is_named():
  opt = load_config('demo', {'optimizer.name': 'lamb'}).optimizer
  with pytest.raises(ValueError, match="'lamb'"):
    optim.create_optimizer(opt, lambda step: 0.1)


def test_sharded_step_equals_one_device_step(data_dir):
  """8-way data parallelism gives the 1-device loss and (sync) BN stats."""
  from input_pipeline import detection  # pylint: disable=g-import-not-at-top
  config = load_config('demo', {**TINY_DEMO, 'data.data_dir': data_dir})
  model = models.build_model(config)
  schedule = optim.learning_rate_schedule(config.optimizer,
                                              config.batch_size, 12)
  tx = optim.create_optimizer(config.optimizer, schedule)
  it = detection.train_iterator(config.data, batch_size=config.batch_size,
                                seed=config.seed)
  batches = [next(it) for _ in range(2)]

  mesh8 = sharding.create_mesh(config.mesh)
  assert mesh8.shape['data'] == 8
  with jax.set_mesh(mesh8):
    initial, _ = train_lib.create_state(model, tx, config, mesh8)
    initial = jax.device_get(initial)  # Host copy: the steps donate.

  results = {}
  for n in (8, 1):
    mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:n])
    with jax.set_mesh(mesh):
      shardings = jax.tree.map(lambda _: sharding.replicated(mesh), initial)
      state = jax.device_put(initial, shardings)
      step = train_lib.make_train_step(model, config, tx, schedule,
                                       shardings, mesh)
      losses = []
      for batch in batches:
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics['loss']))
      results[n] = losses, jax.device_get(state)

  (losses8, state8), (losses1, state1) = results[8], results[1]
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  # BN statistics after one and two steps: global over the batch, as on 1.
  # Each step adds (1 - momentum) x the batch statistic, so the absolute
  # tolerance bounds the batch statistics' difference by 1e-4.
  atol = 1e-4 * (1 - config.model.bn_momentum)
  assert_trees(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=atol)
  assert_trees(state8.params, state1.params, rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path,
                                                        monkeypatch):
  """A NaN at step 3 (poisoned inputs) stops the run; checkpoint 2 stays."""
  from input_pipeline import detection  # pylint: disable=g-import-not-at-top

  def poisoned_train_iterator(*args, **kwargs):
    for i, batch in enumerate(detection.train_iterator(*args, **kwargs)):
      if i >= 2:  # Batch of step 3 onwards.
        batch['image'] = np.full_like(batch['image'], np.nan)
      yield batch

  monkeypatch.setattr(tasks.Detection, 'data', (
      types.SimpleNamespace(train_iterator=poisoned_train_iterator,
                            eval_iterator=detection.eval_iterator)))
  # Logs every 5 steps, so the step is found by the check that runs while
  # the next step is computed, not only at a log step.
  config = load_config('demo', {**TINY_DEMO, 'data.data_dir': data_dir,
                                'checkpoint_every_steps': 2,
                                'log_every_steps': 5})
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=r'Loss became nan at step 3\b.*checkpoint'):
    run_in_process(config, tmp_path)
  assert checkpoints.saved_steps(tmp_path) == [2]
  saved = checkpoints.restore_arrays(tmp_path)
  assert int(saved['step']) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def _two_steps(config):
  """Builds a config's model and runs two training steps on its data."""
  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  model = models.build_model(config)
  data = tasks.get_task(config, model).data
  steps = optim.total_steps(config)
  schedule = optim.learning_rate_schedule(config.optimizer,
                                              config.batch_size, steps)
  tx = optim.create_optimizer(config.optimizer, schedule)
  it = data.train_iterator(config.data, batch_size=config.batch_size,
                           seed=config.seed)
  with jax.set_mesh(mesh):
    state, shardings = train_lib.create_state(model, tx, config, mesh)
    step = train_lib.make_train_step(model, config, tx, schedule, shardings,
                                     mesh)
    losses = []
    for _ in range(2):
      state, metrics = step(state, sharding.global_batch(next(it), mesh))
      losses.append(float(metrics['loss']))
  return int(state.step), losses


def tiny_overrides(name: str) -> dict:
  """Command-line overrides that shrink a config to seconds on a CPU: its
  own settings on the tiny permutation of its family (tiny.py)."""
  config = load_config(name, {})
  common = {'total_steps': 2, 'batch_size': 8, **TINY_BACKBONE,
            'model.block_repeats': 1}
  if specs.is_mobile(config.model.model_id):
    common['model.block_specs'] = TINY_MOBILE_SPECS
  if config.task == 'classification':
    return {**common, **TINY_CLASSIFICATION_DATA,
            'data.name': 'shapes/classification'}
  return {**common, **TINY_DATA, **TINY_HEAD, 'data.name': 'shapes/detection'}


# demo and shapes_classification train end to end in the tests above; the
# finetune configs are theirs with other schedules and the user's data
# (trained in test_own_data.py, fine-tuned in test_finetune.py). Of the
# recipes, the bfloat16 COCO recipe runs two steps; the others' train steps
# are traced and lowered, not compiled (compiling each cost CI 14-117 s;
# their networks differ from it in scaling, which test_models.py checks
# against the published sizes, and classification trains in
# test_classification_loss_decreases).
TRAINED_RECIPES = ('spinenet49_coco',)


@pytest.mark.parametrize('name', [
    n for n in CONFIG_NAMES if n not in ('demo', 'shapes_classification',
                                         'finetune', 'finetune_classification')])
def test_config_builds_and_trains_two_steps(name, data_dir):
  """Each recipe, shrunk, on the built-in data; keeps its dtype, schedule,
  loss, stochastic depth, head type and class count."""
  config = load_config(name, {**tiny_overrides(name),
                              'data.data_dir': data_dir})
  if name not in TRAINED_RECIPES:
    from spinenet_jax import step_audit  # pylint: disable=g-import-not-at-top
    text = step_audit.lower_train_step(config).as_text()
    assert 'stablehlo.convolution' in text or 'dot_general' in text
    return
  step, losses = _two_steps(config)
  assert step == 2
  assert all(np.isfinite(losses)), losses


def test_configs_are_listed():
  assert {'demo', 'shapes_classification', 'spinenet49_coco',
          'spinenet143_coco', 'spinenet190_coco',
          'spinenet49_imagenet'} <= set(CONFIG_NAMES)


# ------------------------------------------------------- subprocess tests


def test_resume_after_sigterm_and_after_sigkill_is_exact(
    det_reference, data_dir, compile_cache, tmp_path):
  """SIGTERM at step >= 3, resume, SIGKILL after the next checkpoint,
  resume: every step and the final state equal the uninterrupted run's.

  One chain of three runs (cheaper than two chains of two); each resumed
  run's logged losses are compared with the reference as soon as it ends.
  Bitwise: the same executables (persistent cache), the data stream and the
  RNG are functions of the step, and the restore is exact.
  """
  reference = det_reference
  workdir = tmp_path / 'run'
  want = train_losses(reference.workdir)

  def logged_since(step):
    return {s: l for s, l in train_losses(workdir).items() if s > step}

  # 1. SIGTERM once step 3 is logged: saves the current step, exits 0.
  run = Train(workdir, TINY_DEMO, data_dir, compile_cache,
              '--num_cpu_devices=8', name='sigterm')
  run.wait_for(lambda: max(train_losses(workdir), default=0) >= 3,
               'step 3')
  run.proc.send_signal(signal.SIGTERM)
  log = run.assert_ok()
  m = re.search(r'SIGTERM: saved step (\d+) and stopped', log)
  assert m, log[-3000:]
  stopped = int(m.group(1))
  assert 3 <= stopped < 10
  assert checkpoints.saved_steps(workdir)[-1] == stopped

  # 2. Resume (checkpointing every 2 steps); SIGKILL as soon as the first
  # new checkpoint is complete (Orbax renames it into place when done).
  run = Train(workdir, {**TINY_DEMO, 'checkpoint_every_steps': 2}, data_dir,
              compile_cache, '--num_cpu_devices=8', name='sigkill')
  run.wait_for(lambda: checkpoints.saved_steps(workdir)[-1] > stopped,
               'a new checkpoint')
  run.proc.kill()
  assert run.wait() == -signal.SIGKILL
  assert resumed_from(run.log) == stopped
  killed = checkpoints.saved_steps(workdir)[-1]
  assert killed < 12, 'the run finished before SIGKILL'
  after_sigterm = logged_since(stopped)
  assert after_sigterm and after_sigterm == {s: want[s] for s in after_sigterm}

  # 3. Resume to the end.
  log = Train(workdir, TINY_DEMO, data_dir, compile_cache,
              '--num_cpu_devices=8', name='resume').assert_ok()
  assert resumed_from(log) == killed
  assert train_losses(workdir) == want
  assert_same_final_state(workdir, reference.workdir, 12)


def test_checkpoint_of_8_devices_continues_on_2(det_reference, data_dir,
                                                compile_cache, tmp_path):
  reference = det_reference
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(checkpoints.checkpoint_dir(reference.workdir),
                               '4'),
                  os.path.join(checkpoints.checkpoint_dir(workdir), '4'))

  # Restored onto a 2-device mesh (here, abstractly): exact, replicated.
  config = load_config('demo', {**TINY_DEMO, 'data.data_dir': data_dir})
  model = models.build_model(config)
  tx = optim.create_optimizer(config.optimizer, optim.
                                  learning_rate_schedule(config.optimizer, 8,
                                                         12))
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:2])
  shardings = jax.tree.map(
      lambda _: sharding.replicated(mesh),
      jax.eval_shape(lambda: train_lib.init_state(model, tx, config)))
  manager = checkpoints.create_manager(str(workdir))
  try:
    state = checkpoints.restore(manager, train_lib.abstract_state(
        model, tx, config, shardings))
  finally:
    manager.close()
  assert all(x.sharding.device_set == set(jax.devices()[:2])
             for x in jax.tree.leaves(state))
  saved = checkpoints.restore_arrays(workdir, 4)
  for key in ('params', 'batch_stats', 'opt_state'):
    assert_trees(jax.device_get(getattr(state, key)), saved[key])

  log = Train(workdir, TINY_DEMO, data_dir, compile_cache,
              '--num_cpu_devices=2').assert_ok()
  assert resumed_from(log) == 4
  assert checkpoints.saved_steps(workdir)[-1] == 12
  losses, want = train_losses(workdir), train_losses(reference.workdir)
  assert sorted(losses) == list(range(5, 13))
  assert np.isfinite(list(losses.values())).all()
  # Same state and global batches; only the split of the batch reductions
  # (BN statistics, gradients) over 2 devices instead of 8 changes the
  # rounding. The first steps agree to float precision; later ones drift
  # apart because training at this learning rate (gradients clipped at norm
  # 10 most steps) amplifies rounding differences about tenfold per step
  # (measured relative loss differences: 0 at step 5, 3e-6 at 6, 5e-5 at 7,
  # 7e-4 at 8, 3e-2 at 12), so final parameters are not compared here.
  np.testing.assert_allclose(losses[5], want[5], rtol=1e-6)
  np.testing.assert_allclose(losses[6], want[6], rtol=1e-4)


def test_two_processes_equal_one(data_dir, compile_cache, tmp_path,
                                 monkeypatch):
  """2 processes x 2 devices == 1 process x 4 devices on the same batches,
  with a SIGTERM to process 1 only on the way: both processes save the same
  step and exit 0, and restarting both finishes the run."""
  from input_pipeline import detection  # pylint: disable=g-import-not-at-top
  # A small learning rate, so that the processes' different rounding stays
  # small over the run (see test_checkpoint_of_8_devices_continues_on_2).
  overrides = {**TINY_DEMO, 'total_steps': 6, 'checkpoint_every_steps': 3,
               'optimizer.base_learning_rate': 0.064}
  workdir = tmp_path / 'two'

  def start(name):
    port = free_port()
    return [Train(workdir, overrides, data_dir, compile_cache,
                  f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}',
                  '--num_cpu_devices=2', name=f'{name}{i}')
            for i in (0, 1)]

  runs = start('process')
  runs[0].wait_for(lambda: 'step 1/6' in runs[0].log, 'step 1')
  runs[1].proc.send_signal(signal.SIGTERM)
  logs = [run.assert_ok() for run in runs]
  m = re.search(r'SIGTERM: saved step (\d+) and stopped', logs[0])
  assert m and 'step 6/6' not in logs[0], logs[0][-3000:]
  stopped = int(m.group(1))
  assert checkpoints.saved_steps(workdir)[-1] == stopped
  runs = start('resumed')

  # Meanwhile the baseline, in this process on 4 of the 8 test devices,
  # with the global batches the two processes assemble: process p's half
  # (its own split and stream) in rows [4p, 4p + 4).
  def two_process_batches(data_cfg, *, batch_size, seed, start_step=0):
    its = [detection.train_iterator(
        data_cfg, batch_size=batch_size, seed=seed, start_step=start_step,
        process_index=p, process_count=2) for p in (0, 1)]
    while True:
      halves = [next(it) for it in its]
      yield {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}

  create_mesh = sharding.create_mesh
  monkeypatch.setattr(sharding, 'create_mesh', lambda mesh_config=None: (
      create_mesh(mesh_config, devices=jax.devices()[:4])))
  monkeypatch.setattr(tasks.Detection, 'data', (
      types.SimpleNamespace(train_iterator=two_process_batches,
                            eval_iterator=detection.eval_iterator)))
  baseline = tmp_path / 'one'
  config = load_config('demo', {**overrides, 'data.data_dir': data_dir})
  result, _ = run_in_process(config, baseline)

  logs = [run.assert_ok() for run in runs]
  assert 'step 6/6' in logs[0] and 'step 6/6' not in logs[1]  # Process 0 logs.
  assert resumed_from(logs[0]) == stopped
  assert checkpoints.saved_steps(workdir)[-1] == 6
  losses, want = train_losses(workdir), train_losses(baseline)
  assert sorted(losses) == list(range(1, 7))
  # The same computation; the cross-process reductions (gloo) may add in a
  # different order than the in-process ones.
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [want[s] for s in range(1, 7)], rtol=1e-5)
  # Measured: parameters differ by at most 1.2e-7, BN statistics by 1e-6
  # (values up to ~0.1), momentum traces (sums of gradients) by 7e-6.
  assert_same_final_state(workdir, baseline, 6, tolerances={
      'params': dict(rtol=1e-5, atol=1e-6),
      'batch_stats': dict(rtol=1e-4, atol=1e-5),
      'opt_state': dict(rtol=1e-3, atol=5e-5)})
  two = [r for r in read_metrics(workdir) if 'AP' in r]
  assert two and abs(two[-1]['AP'] - result['AP']) < 1e-3
