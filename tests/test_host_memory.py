"""`host_memory`: XLA:CPU's big buffers stop faulting in; tcmalloc."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from spinenet_jax import host_memory

# Page faults per call (median of the last 10 of 40) of a jitted program
# whose 64 MiB output glibc would otherwise map afresh at every call (over
# the 32 MiB cap of its mmap threshold).
_PROGRAM = textwrap.dedent("""
    import resource, statistics, sys
    import jax, jax.numpy as jnp
    from spinenet_jax import host_memory
    if sys.argv[1] == 'keep':
      assert host_memory.keep_freed_memory()
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((16, 1024, 1024), jnp.float32)
    faults = []
    for _ in range(40):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # glibc's heap takes a few calls to hold enough free space.
    print('FAULTS', statistics.median(faults[-10:]))
""")


def _faults_per_call(mode: str) -> float:
  out = subprocess.run([sys.executable, '-c', _PROGRAM, mode],
                       capture_output=True, text=True, check=True).stdout
  return float(out.split('FAULTS')[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='keep_freed_memory tunes glibc malloc only')
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  default = _faults_per_call('default')
  # 64 MiB is 16,384 pages of 4 KiB: glibc's defaults fault them all in,
  # unless transparent huge pages back every fresh mapping.
  if default < 8000:
    pytest.skip(f'{default} page faults per call with glibc defaults: huge '
                'pages back fresh mappings here, nothing to compare')
  keep = _faults_per_call('keep')
  assert keep < default / 20, (keep, default)


# ------------------------------------------------------------------ tcmalloc

class _Exec(Exception):
  """Raised by the stand-in for os.execve."""


@pytest.fixture
def execve(monkeypatch):
  calls = []

  def fake(path, argv, env):
    calls.append((path, argv, env))
    raise _Exec
  monkeypatch.setattr(host_memory.os, 'execve', fake)
  for name in (host_memory.ENV, 'SPINENET_JAX_MALLOC_REEXEC', 'LD_PRELOAD'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, 'preloaded_allocator', lambda: None)
  return calls


def test_restarts_under_tcmalloc_with_the_same_command_line(execve,
                                                             monkeypatch):
  monkeypatch.setattr(host_memory, 'find_tcmalloc', lambda: 'libtc.so.4')
  monkeypatch.setenv('LD_PRELOAD', 'libother.so')
  with pytest.raises(_Exec):
    host_memory.run_under_tcmalloc(['train.py', '--workdir=w'])
  (path, argv, env), = execve
  assert path == sys.executable
  assert argv == [sys.executable, 'train.py', '--workdir=w']
  assert env['LD_PRELOAD'] == 'libtc.so.4 libother.so'
  assert env['SPINENET_JAX_MALLOC_REEXEC'] == '1'
  assert int(env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD']) >= 1 << 40


@pytest.mark.parametrize('setting', [
    {'SPINENET_JAX_MALLOC': 'glibc'},  # Asked for glibc.
    {'SPINENET_JAX_MALLOC_REEXEC': '1'},  # Restarted once already.
    {'preloaded': True},  # jemalloc or tcmalloc loaded by the user.
    {'found': False},  # auto, and no tcmalloc on the system.
])
def test_no_restart(execve, monkeypatch, setting):
  found = setting.pop('found', True)
  monkeypatch.setattr(host_memory, 'find_tcmalloc',
                      lambda: 'libtc.so.4' if found else None)
  if setting.pop('preloaded', False):
    monkeypatch.setattr(host_memory, 'preloaded_allocator',
                        lambda: '/usr/lib/libjemalloc.so.2')
  for key, value in setting.items():
    monkeypatch.setenv(key, value)
  host_memory.run_under_tcmalloc(['train.py'])
  assert not execve


def test_required_tcmalloc_missing_says_how_to_install(execve, monkeypatch):
  monkeypatch.setattr(host_memory, 'find_tcmalloc', lambda: None)
  monkeypatch.setenv(host_memory.ENV, 'tcmalloc')
  with pytest.raises(RuntimeError, match='libtcmalloc-minimal4'):
    host_memory.run_under_tcmalloc(['train.py'])
  assert not execve


def test_bad_choice_names_the_value_and_the_choices(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, 'jemalloc')
  with pytest.raises(ValueError, match=r"'jemalloc'.*'auto', 'tcmalloc', "
                     r"'glibc'"):
    host_memory.choice()


_RESTARTED = textwrap.dedent("""
    from spinenet_jax import host_memory
    host_memory.run_under_tcmalloc()
    print('ALLOCATOR', host_memory.preloaded_allocator())
    print('KEPT', host_memory.keep_freed_memory())
    print(host_memory.describe())
""")


@pytest.mark.parametrize('mode', ['auto', 'glibc'])
def test_a_real_start_picks_the_malloc_asked_for(mode):
  """A real interpreter: 'auto' restarts under tcmalloc where the system
  has it and otherwise runs on under glibc with the hint to install it;
  'glibc' never restarts and gives no hint."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'SPINENET_JAX_MALLOC_REEXEC')}
  env[host_memory.ENV] = mode
  out = subprocess.run([sys.executable, '-c', _RESTARTED], env=env,
                       capture_output=True, text=True, check=True).stdout
  if mode == 'auto' and host_memory.find_tcmalloc():
    assert 'libtcmalloc' in out.split('ALLOCATOR')[1].splitlines()[0], out
    assert 'KEPT False' in out  # glibc's settings do not apply.
    assert 'Host memory: libtcmalloc' in out
  elif mode == 'auto':  # No tcmalloc here: glibc, and how to get it.
    assert 'ALLOCATOR None' in out
    if sys.platform.startswith('linux'):
      assert 'apt install libtcmalloc-minimal4' in out, out
  else:
    assert 'ALLOCATOR None' in out
    assert 'Host memory: glibc malloc.' in out  # No hint when asked for.
