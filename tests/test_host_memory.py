"""`host_memory.keep_freed_memory`: XLA:CPU's big buffers stop faulting in."""

import platform
import subprocess
import sys
import textwrap

import pytest

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
