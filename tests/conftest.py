"""Test set-up: 8 CPU devices, configured before JAX creates its backends.

A report at the end of every run: the 10 slowest tests, each with the time
its in-process XLA compilations took, so that growth shows in every CI log.

Also the fixtures that several test modules share: a persistent compilation
cache, the tiny datasets, the tiny demo detection and classification runs
trained once per session (configurations in tiny.py) and the images that the
inference and predict tests feed them.
"""
import collections
import os
from pathlib import Path
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import tiny  # noqa: E402

from jax import monitoring  # noqa: E402

# ------------------------------------------------- slowest-tests report

_SLOWEST = 10
_test_secs = collections.defaultdict(float)  # nodeid -> setup+call+teardown
_compile_secs = collections.defaultdict(float)  # nodeid -> XLA compile
_running = []  # The nodeid being run, if any.


def _on_duration(event: str, duration: float, **_) -> None:
  # Backend compilation only: tracing and lowering events nest.
  if event == '/jax/core/compile/backend_compile_duration' and _running:
    _compile_secs[_running[-1]] += duration


monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _running.append(item.nodeid)
  try:
    yield
  finally:
    _running.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Carries the test's compile seconds in its teardown report, which
  reaches the controller process under pytest-xdist too."""
  del item
  outcome = yield
  if call.when == 'teardown':
    report = outcome.get_result()
    report.user_properties.append(
        ('compile_s', _compile_secs.get(report.nodeid, 0.0)))


def pytest_runtest_logreport(report):
  _test_secs[report.nodeid] += report.duration
  for key, value in report.user_properties:
    if key == 'compile_s':
      _compile_secs[report.nodeid] = value


def pytest_terminal_summary(terminalreporter):
  """The slowest tests, with their share of XLA compilation."""
  if not _test_secs:
    return
  tr = terminalreporter
  total, compiled = sum(_test_secs.values()), sum(_compile_secs.values())
  tr.section(f'{_SLOWEST} slowest tests (setup + call + teardown)')
  tr.write_line(f'{"total s":>8} {"compile s":>9}  test   (shared fixtures '
                'count in the first test that uses them; subprocesses\' '
                'compilation is not seen)')
  for nodeid, secs in sorted(_test_secs.items(), key=lambda kv: -kv[1])[
      :_SLOWEST]:
    tr.write_line(f'{secs:8.1f} {_compile_secs[nodeid]:9.1f}  {nodeid}')
  tr.write_line(f'{total:8.1f} {compiled:9.1f}  all {len(_test_secs)} tests')


# -------------------------------------------------------------- fixtures

# Of the persistent compilation cache (JAX's own limit needs filelock).
CACHE_MAX_BYTES = 500 << 20


@pytest.fixture(scope='session', autouse=True)
def compile_cache(request, tmp_path_factory) -> str:
  """A persistent XLA cache for the session and its `train.py` subprocesses.

  Identical programs compiled by different tests (the same tiny step in
  several tests, a subprocess resuming a run) compile once. The cache lives
  in pytest's cache directory: a fresh clone starts cold, reruns are warm.
  """
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  cache = getattr(request.config, 'cache', None)
  path = Path(cache.mkdir('spinenet_jax_xla') if cache is not None
              else tmp_path_factory.mktemp('xla_cache'))
  # Keep it bounded: drop the least recently written entries beyond the cap.
  entries = sorted((f for f in path.iterdir() if f.is_file()),
                   key=lambda f: f.stat().st_mtime)
  total = sum(f.stat().st_size for f in entries)
  for f in entries:
    if total <= CACHE_MAX_BYTES:
      break
    total -= f.stat().st_size
    f.unlink()
  # Every program, not only those over JAX's default 1 s: subprocesses
  # otherwise recompile dozens of small ones.
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  compilation_cache.reset_cache()
  yield str(path)
  jax.config.update('jax_compilation_cache_dir', previous[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', previous[1])
  compilation_cache.reset_cache()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """The tiny shapes datasets, built once (and before any subprocess)."""
  from input_pipeline import common as data_common  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tfds'))
  for name, overrides in (('demo', tiny.TINY_DEMO),
                          ('shapes_classification', tiny.TINY_CLASSIFICATION)):
    config = tiny.load_config(name, {**overrides, 'data.data_dir': path})
    data_common.get_builder(config.data)
  return path


def _train(name: str, overrides: dict, data_dir: str,
           workdir) -> types.SimpleNamespace:
  config = tiny.load_config(name, {**overrides, 'data.data_dir': data_dir})
  result, stdout = tiny.run_in_process(config, workdir)
  return types.SimpleNamespace(workdir=str(workdir), result=result,
                               stdout=stdout)


@pytest.fixture(scope='session')
def det_reference(data_dir, tmp_path_factory):
  """The tiny demo run, uninterrupted, in-process (checkpoints 4, 8, 12):
  `.workdir`, `.result` (the final evaluation), `.stdout` (its console)."""
  return _train('demo', tiny.TINY_DEMO, data_dir,
                tmp_path_factory.mktemp('det_reference'))


@pytest.fixture(scope='session')
def det_workdir(det_reference) -> str:
  return det_reference.workdir


@pytest.fixture(scope='session')
def det_run(det_workdir):
  import spinenet_jax  # pylint: disable=g-import-not-at-top
  return spinenet_jax.load_checkpoint(det_workdir)


@pytest.fixture(scope='session')
def cls_reference(data_dir, tmp_path_factory):
  """The tiny shapes classification run (20 steps, checkpoint 20)."""
  return _train('shapes_classification', tiny.TINY_CLASSIFICATION, data_dir,
                tmp_path_factory.mktemp('cls_reference'))


@pytest.fixture
def sample_images():
  """Two RGB images of different sizes and aspect ratios."""
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (100, 150, 3), np.uint8),
          rng.integers(0, 256, (200, 90, 3), np.uint8)]
