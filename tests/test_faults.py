"""Failure paths: damaged checkpoints, another config's run, a locked or
stale workdir, a bad config value, a non-finite loss and its rollback, a
dead peer.

SIGTERM on process 1 of 2 is in tests/test_train.py
(`test_two_processes_equal_one`); bad records in tests/test_bad_data.py;
bad configs in tests/test_config_checks.py. benchmarks/faults.py runs
every case end to end through `train.py` and times the recovery.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from spinenet_jax import checkpoints
from spinenet_jax import models
from spinenet_jax import nonfinite
from spinenet_jax import optim
from spinenet_jax import sharding
from spinenet_jax import tasks
from spinenet_jax import train_lib
from spinenet_jax import workdir_lock
from tests import fault_injection
from tests.test_train import assert_same_final_state
from tests.test_train import assert_trees
from tests.test_train import free_port
from tests.test_train import read_metrics
from tests.test_train import Train
from tests.tiny import load_config
from tests.tiny import REPO
from tests.tiny import run_in_process
from tests.tiny import TINY_DEMO


def copy_run(reference: str, workdir, steps=(4, 8)) -> str:
  """The reference run's config and the checkpoints of `steps`."""
  for step in steps:
    shutil.copytree(
        os.path.join(checkpoints.checkpoint_dir(reference), str(step)),
        os.path.join(checkpoints.checkpoint_dir(workdir), str(step)))
  shutil.copy(os.path.join(reference, checkpoints.CONFIG_FILE), workdir)
  return str(workdir)


def tiny_config(data_dir, **overrides):
  return load_config('demo', {**TINY_DEMO, 'data.data_dir': data_dir,
                              **overrides})


def abstract_state(config):
  model = models.build_model(config)
  tx = optim.create_optimizer(config.optimizer, optim.learning_rate_schedule(
      config.optimizer, config.batch_size, config.total_steps))
  mesh = sharding.create_mesh(config.mesh)
  shardings = jax.tree.map(
      lambda _: sharding.replicated(mesh),
      jax.eval_shape(lambda: train_lib.init_state(model, tx, config)))
  return train_lib.abstract_state(model, tx, config, shardings)


def listing(workdir) -> list[str]:
  return sorted(os.listdir(checkpoints.checkpoint_dir(workdir)))


# ------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize('damage', sorted(fault_injection.DAMAGE))
def test_damaged_latest_checkpoint_is_moved_aside(damage, det_workdir,
                                                  data_dir, tmp_path, capfd):
  """One warning naming step 8 and why; 8 -> 8.corrupt; step 4 restores
  exactly; none of Orbax's tracebacks reach the console."""
  workdir = copy_run(det_workdir, tmp_path / 'run')
  fault_injection.DAMAGE[damage](
      os.path.join(checkpoints.checkpoint_dir(workdir), '8'))
  warnings = []
  manager = checkpoints.create_manager(workdir)
  try:
    state, step = checkpoints.restore_newest_good(
        manager, abstract_state(tiny_config(data_dir)), warnings.append)
    assert manager.latest_step() == 4
  finally:
    manager.close()
  assert step == 4 and int(state.step) == 4
  assert listing(workdir) == ['4', '8.corrupt']
  assert checkpoints.saved_steps(workdir) == [4]
  assert len(warnings) == 1, warnings
  assert 'checkpoint 8 is damaged' in warnings[0]
  assert 'Resuming from step 4' in warnings[0]
  saved = checkpoints.restore_arrays(det_workdir, 4)
  assert_trees(jax.device_get(state.params), saved['params'])
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err


def test_resume_past_a_damaged_checkpoint_is_exact(det_reference, data_dir,
                                                   tmp_path):
  """Checkpoint 8 truncated: the run resumes from 4 and its step 12 equals
  the uninterrupted run's bitwise."""
  workdir = copy_run(det_reference.workdir, tmp_path / 'run')
  fault_injection.truncate_arrays(
      os.path.join(checkpoints.checkpoint_dir(workdir), '8'))
  result, stdout = run_in_process(tiny_config(data_dir), workdir)
  assert 'checkpoint 8 is damaged' in stdout
  assert 'Resumed from' in stdout and stdout.count('WARNING') == 1, stdout
  assert result['step'] == 12
  assert '8.corrupt' in listing(workdir)
  assert_same_final_state(workdir, det_reference.workdir, 12)


def test_all_checkpoints_damaged_is_one_error_and_exit_1(
    det_workdir, data_dir, compile_cache, tmp_path):
  workdir = copy_run(det_workdir, tmp_path / 'run')
  for step, damage in ((4, 'garbage_manifest'), (8, 'truncated_arrays')):
    fault_injection.DAMAGE[damage](
        os.path.join(checkpoints.checkpoint_dir(workdir), str(step)))
  run = Train(workdir, TINY_DEMO, data_dir, compile_cache,
              '--num_cpu_devices=8', name='all_damaged')
  assert run.wait() == 1
  log = run.log
  assert 'train.py: None of the 2 checkpoints' in log, log[-3000:]
  assert 'Nothing was moved' in log
  assert 'Traceback' not in log and 'Event loop is closed' not in log, log
  assert listing(workdir) == ['4', '8']


def test_bad_config_value_is_one_line_before_anything_is_built(
    data_dir, compile_cache, tmp_path):
  """train.py validates the config first: one line naming the field, no
  traceback, and no checkpoint written."""
  workdir = tmp_path / 'bad_config'
  run = Train(workdir, {**TINY_DEMO, 'nan_policy': 'rolback'}, data_dir,
              compile_cache, '--num_cpu_devices=8', name='bad_config')
  assert run.wait() == 1
  log = run.log
  assert "train.py: config.nan_policy='rolback'" in log, log[-3000:]
  assert "'rollback'" in log and 'Traceback' not in log, log[-3000:]
  assert not os.path.exists(checkpoints.checkpoint_dir(str(workdir)))


def test_another_configs_run_names_the_variable(det_workdir, data_dir,
                                                tmp_path):
  """Resuming a run with another num_classes: the differing variable and
  config fields are named; nothing is moved and config.json is kept."""
  workdir = copy_run(det_workdir, tmp_path / 'run')
  with open(os.path.join(workdir, checkpoints.CONFIG_FILE)) as f:
    saved_config = f.read()
  config = tiny_config(data_dir, **{'model.num_classes': 5})
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match=r'class_predict.*model\.num_classes=\d+; this '
                           r'config has model\.num_classes=5'):
    run_in_process(config, workdir)
  assert listing(workdir) == ['4', '8']
  with open(os.path.join(workdir, checkpoints.CONFIG_FILE)) as f:
    assert f.read() == saved_config


def test_load_checkpoint_skips_a_damaged_newest_step(det_workdir, tmp_path):
  """Research code: step=None loads the newest good step (with a warning);
  asking for the damaged step names it."""
  import spinenet_jax  # pylint: disable=g-import-not-at-top
  workdir = copy_run(det_workdir, tmp_path / 'run')
  fault_injection.truncate_arrays(
      os.path.join(checkpoints.checkpoint_dir(workdir), '8'))
  with pytest.warns(UserWarning, match='checkpoint 8 .*damaged'):
    run = spinenet_jax.load_checkpoint(workdir)
  assert run.step == 4
  with pytest.raises(checkpoints.DamagedCheckpointError, match=r'/8\b'):
    spinenet_jax.load_checkpoint(workdir, step=8)
  assert listing(workdir) == ['4', '8']  # Research code moves nothing.


# ------------------------------------------------------------ workdir lock


def test_second_trainer_on_a_locked_workdir_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf'in use by another trainer: pid {os.getpid()} '
                             r'on host \S+, started \d{4}-'):
      run_in_process(tiny_config(data_dir), workdir)
    assert not os.path.exists(checkpoints.checkpoint_dir(workdir))
  assert not os.path.exists(os.path.join(workdir, workdir_lock.HOLDER_FILE))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdir_lock.HOLDER_FILE), 'w') as f:
    json.dump({'host': 'h', 'pid': dead.pid, 'started': 'then'}, f)
  warnings = []
  with workdir_lock.WorkdirLock(workdir, warn=warnings.append):
    holder = workdir_lock.read_holder(workdir)
    assert holder['pid'] == os.getpid()
  assert len(warnings) == 1
  assert f'stale lock' in warnings[0] and f'pid {dead.pid}' in warnings[0]


# -------------------------------------------------------- non-finite loss


def _metrics(**kw):
  base = {'loss': 1.0, 'cls_loss': 0.5, 'box_loss': 0.01, 'grad_norm': 2.0,
          'grad_norm/backbone/stem': 1.0, 'grad_norm/head/class_predict': 1.0,
          nonfinite.INPUT_KEY: 0}
  return {**base, **kw}


@pytest.mark.parametrize('metrics, named', [
    (_metrics(loss=np.nan, **{nonfinite.INPUT_KEY: 12}),
     r'the input batch \(12 non-finite pixels\)'),
    (_metrics(loss=np.inf, box_loss=np.inf), r'the loss part box_loss'),
    (_metrics(grad_norm=np.nan, **{'grad_norm/head/class_predict': np.nan}),
     r'The gradient norm became nan at step 7; first non-finite: the '
     r'gradient of the head/class_predict parameters'),
])
def test_nonfinite_names_the_step_and_first_quantity(metrics, named):
  with pytest.raises(nonfinite.NonFiniteLossError,
                     match=rf'at step 7; first non-finite: .*{named}|{named}'
                     ) as e:
    nonfinite.check(metrics, 7, last_checkpoint=4)
  assert 'step 4, is kept' in str(e.value) and e.value.step == 7
  nonfinite.check(_metrics(), 7, None)  # Finite: no error.


def test_rollback_restores_halves_the_learning_rate_and_finishes(
    det_workdir, data_dir, tmp_path, monkeypatch):
  """A NaN batch at step 6, once: rollback to checkpoint 4 with the learning
  rate halved; the run finishes all 12 steps."""
  from input_pipeline import detection  # pylint: disable=g-import-not-at-top
  poisoned = []

  def train_iterator(*args, start_step=0, **kwargs):
    it = detection.train_iterator(*args, start_step=start_step, **kwargs)
    for step, batch in enumerate(it, start_step + 1):
      if step == 6 and not poisoned:
        poisoned.append(step)
        batch['image'] = np.full_like(batch['image'], np.nan)
      yield batch

  monkeypatch.setattr(tasks.Detection, 'data', types.SimpleNamespace(
      train_iterator=train_iterator, eval_iterator=detection.eval_iterator))
  workdir = copy_run(det_workdir, tmp_path / 'run', steps=(4,))
  config = tiny_config(data_dir, nan_policy='rollback', nan_max_rollbacks=1)
  result, stdout = run_in_process(config, workdir)
  assert poisoned == [6]
  assert 'Loss became nan at step 6; first non-finite: the input batch' in stdout
  assert 'Rollback 1 of 1: continuing from step 4 with the learning rate x0.5' \
      in stdout
  assert result['step'] == 12 and np.isfinite(result['AP'])
  records = read_metrics(workdir)
  assert {'step': 6, 'nan_rollbacks': 1, 'learning_rate_scale': 0.5} in records
  lrs = {r['step']: r['learning_rate'] for r in records if 'loss' in r}
  reference = {r['step']: r['learning_rate'] for r in read_metrics(det_workdir)
               if 'loss' in r}
  assert lrs[5] == pytest.approx(reference[5] / 2)


def test_rollback_limit_stops(monkeypatch):
  run = types.SimpleNamespace(
      config=types.SimpleNamespace(nan_policy='rollback', nan_max_rollbacks=2),
      writer=types.SimpleNamespace(print=lambda *_: None))
  error = nonfinite.NonFiniteLossError('x', 3)
  with pytest.raises(nonfinite.NonFiniteLossError):
    train_lib._rollback_or_raise(run, error, 2, 0.25)  # pylint: disable=protected-access
  run.config.nan_policy = 'stop'
  with pytest.raises(nonfinite.NonFiniteLossError):
    train_lib._rollback_or_raise(run, error, 0, 1.0)  # pylint: disable=protected-access


# A process of a two-process run that joins, says so and waits.
PEER = """
import sys, time
from spinenet_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout_s=4)
print('joined', flush=True)
time.sleep(120)
"""


def test_dead_peer_is_named_and_the_survivor_exits_1(tmp_path):
  """SIGKILL on process 1: process 0 stops within the heartbeat timeout
  (4 s here, 30 s by default) with one line, exit 1 and no native dump."""
  address = f'127.0.0.1:{free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  logs = [tmp_path / f'peer{i}.log' for i in (0, 1)]
  procs = [subprocess.Popen([sys.executable, '-c', PEER, address, str(i)],
                            cwd=REPO, env=env, stdout=open(log, 'w'),
                            stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  try:
    deadline = time.time() + 120
    while not all('joined' in log.read_text() for log in logs):
      assert time.time() < deadline and procs[0].poll() is None, (
          logs[0].read_text())
      time.sleep(0.1)
    procs[1].kill()
    t0 = time.time()
    assert procs[0].wait(60) == 1
    waited = time.time() - t0
  finally:
    for p in procs:
      p.kill()
  log = logs[0].read_text()
  assert 'train.py: process 1 of 2 stopped responding' in log, log
  assert 'Restart all processes.' in log, log
  for dump in ('Fatal Python error', 'Traceback', '@ 0x', 'Check failed'):
    assert dump not in log, log
  assert waited < 30, waited
