"""Every failure path of training, end to end through `train.py`.

Prints one line per case: what happened, whether it is what should happen,
and how long it took (for a recovery: from the start of the restarted
process to its first new training step; for a stop: from the fault to the
exit). The tiny demo model of the tests (tests/tiny.py) trains on the
built-in shapes data, generated into --workdir; nothing is downloaded.

  python benchmarks/faults.py [--workdir DIR] [--cases damaged,peer_kill_1]

The fast cases are also tests (tests/test_faults.py, test_train.py,
test_config_checks.py, test_bad_data.py); malformed records are checked
there only, on mocked COCO and ImageNet datasets.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/: the tiny configs, checkpoint damage.

from tests import fault_injection  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 12
OVERRIDES = {**tiny.TINY_DEMO, 'total_steps': STEPS}
LONG = {**OVERRIDES, 'total_steps': 200, 'checkpoint_every_steps': 3}
PAIR = {**LONG, 'total_steps': 16}  # Stopped by SIGTERM, then finished.
NATIVE_DUMP = ('Fatal Python error', '@ 0x', 'Check failed', 'Traceback')
# (name, --config overrides or a line of a config file (for what the
# command line cannot set), what the one line must contain): the 12.
BAD_CONFIGS = [
    ('typo in a key', 'c.data.max_instance = 50',
     'did you mean config.data.max_instances?'),
    ('min_level below the backbone', 'c.model.min_level = 2', '3..7'),
    ('max_level above the backbone', 'c.model.max_level = 8', '3..7'),
    ('image size vs 2**max_level', {'data.image_size': 100}, 'multiple of'),
    ('batch vs data shards', {'batch_size': 6}, 'data shards'),
    ('num_classes without background', {'model.num_classes': 3},
     'background'),
    ('mesh vs devices', {'mesh.model': 3}, '8 devices'),
    ('unknown model_id', {'model.model_id': '48'}, "did you mean '49'?"),
    ('eval batch 0, no batch size',
     'c.batch_size = None; c.eval_batch_size = 0', 'batch_size=None'),
    ('schedule past total_steps', {'optimizer.schedule': 'step',
                                   'optimizer.decay_at': (0.5, 1.5)},
     'past the end of training'),
    ('stochastic depth outside [0, 1)',
     {'model.stochastic_depth_rate': 1.0}, '< 1'),
    ('unknown nan_policy', {'nan_policy': 'rolback'}, "'rollback'"),
]
CONFIG_FILE = """from configs import demo
def get_config():
  c = demo.get_config()
  {}
  return c
"""
NAN_STEP = 6  # The step whose batch the `nan` child poisons.


class Run:
  """A train.py process (or the NaN-injecting child) logging to a file."""

  def __init__(self, root: Path, workdir: Path, name: str, overrides: dict,
               *args: str, config: str = 'demo', nan: bool = False):
    self.log_path = root / f'{name}.log'
    self.t0 = time.time()
    entry = ([__file__, 'nan_child'] if nan else [str(REPO / 'train.py')])
    config_path = (config if config.endswith('.py') else
                   REPO / 'configs' / f'{config}.py')
    cmd = [sys.executable, *entry, f'--config={config_path}',
           f'--workdir={workdir}',
           *tiny.cli_overrides({**overrides,
                                'data.data_dir': str(root / 'tfds')}), *args]
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               TF_CPP_MIN_LOG_LEVEL='2',
               JAX_COMPILATION_CACHE_DIR=str(root / 'xla_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    with open(self.log_path, 'w') as log:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)

  @property
  def log(self) -> str:
    return self.log_path.read_text()

  def wait(self, timeout: float = 600) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()

  def wait_for(self, text: str, timeout: float = 600, count: int = 1
               ) -> float:
    """Seconds since start when `text` is in the log `count` times (inf:
    never)."""
    while self.log.count(text) < count:
      if self.proc.poll() is not None or time.time() - self.t0 > timeout:
        return float('inf')
      time.sleep(0.05)
    return time.time() - self.t0

  def last_line(self) -> str:
    lines = [l for l in self.log.splitlines() if l.startswith('train.py:')]
    return lines[-1] if lines else '(no train.py: line)'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def pair(root: Path, workdir: Path, name: str, overrides: dict) -> list[Run]:
  """Two processes x 2 CPU devices of one run."""
  address = f'--coordinator_address=127.0.0.1:{free_port()}'
  return [Run(root, workdir, f'{name}.p{i}', overrides, address,
              '--num_processes=2', f'--process_id={i}',
              '--num_cpu_devices=2') for i in (0, 1)]


def report(case: str, ok: bool, what: str, seconds: float | None) -> bool:
  """Prints the line of one case; returns `ok`."""
  took = '' if seconds is None else f'{seconds:6.1f} s'
  what = what if len(what) <= 160 else what[:156] + ' ...'
  print(f'{case:<40} {"ok  " if ok else "FAIL"} {took:>8}  {what}',
        flush=True)
  return ok


def metrics(workdir: Path) -> list[dict]:
  """The records of a run's `metrics.jsonl`, in order."""
  return [json.loads(l) for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()]


def final_loss(workdir: Path) -> float | None:
  """The training loss logged at the last step."""
  losses = [r['loss'] for r in metrics(workdir) if r.get('step') == STEPS
            and 'loss' in r]
  return losses[-1] if losses else None


def copy_run(base: Path, workdir: Path, steps=(4, 8)) -> Path:
  """A new workdir with `base`'s config and checkpoints `steps`."""
  for step in steps:
    shutil.copytree(base / 'checkpoints' / str(step),
                    workdir / 'checkpoints' / str(step))
  shutil.copy(base / 'config.json', workdir)
  return workdir


# --------------------------------------------------------------- the cases


def damaged(root: Path, base: Path) -> bool:
  """Damaged newest checkpoint (each kind), all damaged, another config."""
  ok = True
  for kind, damage in fault_injection.DAMAGE.items():
    workdir = copy_run(base, root / f'damaged_{kind}')
    damage(str(workdir / 'checkpoints' / '8'))
    run = Run(root, workdir, f'damaged_{kind}', OVERRIDES,
              '--num_cpu_devices=8')
    recovered = run.wait_for('step 5/')
    rc = run.wait()
    same = final_loss(workdir) == final_loss(base)
    moved = (workdir / 'checkpoints' / '8.corrupt').is_dir()
    resumed = f"Resumed from {workdir / 'checkpoints'}/4." in run.log
    good = rc == 0 and resumed and moved and same
    ok &= report(f'damaged latest checkpoint: {kind}', good,
                 f'exit {rc}, 8 moved to 8.corrupt: {moved}, resumed from '
                 f'4: {resumed}, final loss equal to the uninterrupted run: '
                 f'{same}',
                 recovered)
  workdir = copy_run(base, root / 'all_damaged')
  fault_injection.garbage_manifest(str(workdir / 'checkpoints' / '4'))
  fault_injection.truncate_arrays(str(workdir / 'checkpoints' / '8'))
  run = Run(root, workdir, 'all_damaged', OVERRIDES, '--num_cpu_devices=8')
  rc = run.wait()
  ok &= report('every checkpoint damaged', rc == 1 and 'Traceback' not in
               run.log, f'exit {rc}: {run.last_line()}', time.time() - run.t0)
  workdir = copy_run(base, root / 'other_config')
  run = Run(root, workdir, 'other_config',
            {**OVERRIDES, 'model.num_classes': 6}, '--num_cpu_devices=8')
  rc = run.wait()
  ok &= report('resume with another num_classes', rc == 1 and
               'different configuration' in run.log,
               f'exit {rc}: {run.last_line()}', time.time() - run.t0)
  return ok


def locks_and_sigterm(root: Path, base: Path) -> bool:
  """A locked workdir, SIGTERM on one process, a stale lock."""
  workdir = root / 'locked'
  first = Run(root, workdir, 'locked.first', LONG, '--num_cpu_devices=8')
  first.wait_for('step 1/')
  second = Run(root, workdir, 'locked.second', LONG, '--num_cpu_devices=8')
  rc = second.wait()
  ok = report('second trainer on a locked workdir', rc == 1 and
              'in use by another trainer' in second.log,
              f'exit {rc}: {second.last_line()}',
              time.time() - second.t0)
  t = time.time()
  first.proc.send_signal(signal.SIGTERM)
  rc = first.wait()
  m = re.search(r'SIGTERM: saved step (\d+)', first.log)
  ok &= report('SIGTERM, one process', rc == 0 and m is not None,
               f'exit {rc}, saved step {m and m.group(1)}', time.time() - t)
  workdir = copy_run(base, root / 'stale_lock')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  from spinenet_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  (workdir / workdir_lock.HOLDER_FILE).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'started': 'earlier'}))
  run = Run(root, workdir, 'stale_lock', OVERRIDES, '--num_cpu_devices=8')
  recovered = run.wait_for('step 9/')
  rc = run.wait()
  ok &= report('stale lock of a dead process', rc == 0 and
               'stale lock' in run.log, f'exit {rc}, taken over with a '
               'warning, resumed from 8', recovered)
  return ok


def peers(root: Path) -> bool:
  """Two processes: SIGKILL on process 1, on process 0; SIGTERM on 1."""
  ok = True
  for victim in (1, 0):
    workdir = root / f'peer_kill_{victim}'
    runs = pair(root, workdir, f'peer_kill_{victim}', LONG)
    runs[0].wait_for('step 4/')
    t = time.time()
    runs[victim].proc.kill()
    survivor = runs[1 - victim]
    rc = survivor.wait(300)
    waited = time.time() - t
    dump = [d for d in NATIVE_DUMP if d in survivor.log]
    fatal = 'Terminating process because' in survivor.log  # The runtime's.
    good = rc != 0 and waited < 60 and not dump
    what = (f'process {1 - victim} exit {rc}, ' +
            (f'native dump ({dump[0]!r})' if dump else survivor.last_line()))
    if victim == 0:  # Known limitation: the runtime's client aborts (-6).
      what = ('(runtime fatal log line first) ' if fatal else '') + what
    ok &= report(f'SIGKILL on process {victim} of 2', good or victim == 0,
                 what, waited)
  workdir = root / 'peer_sigterm'
  runs = pair(root, workdir, 'peer_sigterm', PAIR)
  runs[0].wait_for('step 2/')
  t = time.time()
  runs[1].proc.send_signal(signal.SIGTERM)
  rcs = [r.wait(300) for r in runs]
  stopped = time.time() - t
  m = re.search(r'SIGTERM: saved step (\d+)', runs[0].log)
  runs = pair(root, workdir, 'peer_sigterm.restart', PAIR)  # Same flags.
  recovered = runs[0].wait_for(f'step {int(m.group(1)) + 1 if m else 1}/')
  again = [r.wait(300) for r in runs]
  ok &= report('SIGTERM on process 1 of 2', rcs == [0, 0] and m is not None
               and again == [0, 0], f'both exit 0 at step {m and m.group(1)} '
               f'after {stopped:.1f} s; restarted pair exits {again}',
               recovered)
  return ok


def nan(root: Path, base: Path) -> bool:
  """A NaN batch at step NAN_STEP with nan_policy stop, then rollback."""
  workdir = copy_run(base, root / 'nan_stop', steps=(4,))
  run = Run(root, workdir, 'nan_stop', OVERRIDES, '--num_cpu_devices=8',
            nan=True)
  rc = run.wait()
  line = run.last_line()
  ok = report('NaN batch, nan_policy=stop', rc == 1 and
              f'step {NAN_STEP}' in line and 'is kept' in line and
              (workdir / 'checkpoints' / '4').is_dir(), f'exit {rc}: {line}',
              time.time() - run.t0)
  workdir = copy_run(base, root / 'nan_rollback', steps=(4,))
  run = Run(root, workdir, 'nan_rollback', {
      **OVERRIDES, 'nan_policy': 'rollback', 'nan_max_rollbacks': 1},
            '--num_cpu_devices=8', nan=True)
  rolled_back = run.wait_for('Rollback 1 of 1')
  recovered = run.wait_for('step 5/', count=2) - rolled_back
  rc = run.wait()
  ok &= report('NaN batch, nan_policy=rollback', rc == 0 and
               'Rollback 1 of 1' in run.log and f'step {STEPS}/' in run.log,
               f'exit {rc}, rolled back to step 4 with the learning rate '
               'halved (time: to its first step), finished', recovered)
  return ok


def bad_configs(root: Path) -> bool:
  """The 12 bad configs of BAD_CONFIGS, each through train.py."""
  ok = True
  for i, (name, change, expect) in enumerate(BAD_CONFIGS):
    config = 'demo'
    if isinstance(change, dict):
      overrides = {**OVERRIDES, **change}
    else:  # The file's line wins over OVERRIDES.
      config = root / f'bad_config_{i}.py'
      config.write_text(CONFIG_FILE.format(change))
      overrides = {k: v for k, v in OVERRIDES.items()
                   if f'c.{k} =' not in change}
    run = Run(root, root / f'bad_config_{i}', f'bad_config_{i}', overrides,
              '--num_cpu_devices=8', config=str(config))
    rc = run.wait()
    line = run.last_line()
    built = (root / f'bad_config_{i}' / 'checkpoints').exists()
    ok &= report(f'bad config: {name}', rc == 1 and expect in line and
                 not built, line.removeprefix('train.py: '),
                 time.time() - run.t0)
  return ok


CASES = {'damaged': damaged, 'locks': locks_and_sigterm, 'peers': peers,
         'nan': nan, 'configs': bad_configs}


def nan_child(argv: list[str]) -> None:
  """train.py with the batch of step NAN_STEP (first attempt) all NaN."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO))
  import train  # pylint: disable=g-import-not-at-top
  from input_pipeline import detection  # pylint: disable=g-import-not-at-top
  from spinenet_jax import tasks  # pylint: disable=g-import-not-at-top
  poisoned = []

  def train_iterator(*args, start_step=0, **kwargs):
    it = detection.train_iterator(*args, start_step=start_step, **kwargs)
    for step, batch in enumerate(it, start_step + 1):
      if step == NAN_STEP and not poisoned:
        poisoned.append(step)
        batch['image'] = np.full_like(batch['image'], np.nan)
      yield batch

  tasks.Detection.data = types.SimpleNamespace(
      train_iterator=train_iterator, eval_iterator=detection.eval_iterator)
  app.run(train.main, argv=['train.py', *argv])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None,
                      help='Scratch directory (default: a new temporary one).')
  parser.add_argument('--cases', default=','.join(CASES),
                      help=f'Comma-separated subset of {", ".join(CASES)}.')
  args = parser.parse_args()
  cases = args.cases.split(',')
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}; choose from {list(CASES)}')
  root = Path(args.workdir or tempfile.mkdtemp(prefix='faults_'))
  root.mkdir(parents=True, exist_ok=True)
  print(f'Scratch: {root}; load: {os.getloadavg()[0]:.2f} on '
        f'{os.cpu_count()} cores', flush=True)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from input_pipeline import common  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.ERROR)
  common.get_builder(tiny.load_config(
      'demo', {**OVERRIDES, 'data.data_dir': str(root / 'tfds')}).data)
  base = root / 'base'
  if set(cases) - {'peers', 'configs'} and not (
      base / 'checkpoints' / '8').is_dir():
    run = Run(root, base, 'base', OVERRIDES, '--num_cpu_devices=8')
    if run.wait() != 0:
      sys.exit(f'The uninterrupted run failed; see {run.log_path}')
    print(f'(uninterrupted run: {time.time() - run.t0:.1f} s)', flush=True)
  results = [CASES[c](root, base) if c not in ('peers', 'configs')
             else CASES[c](root) for c in cases]
  sys.exit(0 if all(results) else 1)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == 'nan_child':
    nan_child(sys.argv[2:])
  else:
    main()
