"""Keep the host memory XLA:CPU frees, so the next step does not fault it in.

XLA:CPU allocates one buffer for a program's temporaries at every call and
frees it when the call returns: 599 MiB for SpineNet-49 RetinaNet's training
step at 256 px batch 2, 3.2 GiB at 640 px. glibc serves an allocation that
large with a fresh `mmap` and returns it with `munmap`, so at every step the
kernel maps and zeroes every page again: 0.24 s of system time in a 0.98 s
step at 256 px and 1.4 s in a 7.0 s step at 640 px (benchmarks/README.md,
"Host memory").

`keep_freed_memory()` has glibc serve such buffers from its heap and keep
what is freed there for the next allocation:
  * `M_ARENA_MAX=1`: one arena for all threads. A thread's own arena maps
    anything over 64 MiB with `mmap` whatever `M_MMAP_MAX` says.
  * `M_MMAP_MAX=0`: no allocation gets its own mapping.
  * `M_TRIM_THRESHOLD=-1`: the heap is never given back.
The process then holds its peak heap until it exits, as tcmalloc or
jemalloc would. Results are unchanged (the same program on the same bytes).

Call it before JAX starts its backend (before the first `jax.devices()` or
computation): threads that have already allocated keep their own arenas.
`train.py` does; library imports never change the process's allocator.

tcmalloc does better still. Kept in one arena, glibc's heap fragments: after
three SpineNet-49 steps at 640 px it held 108,000 free chunks, and each of
the step's 12,000 scratch buffers of 32 KiB-1 MiB (YNNPACK's, for the
matmuls) walked a sorted list of them (`_int_malloc`, 3% of the CPU time).
`run_under_tcmalloc()` starts the program again with gperftools' tcmalloc
preloaded where the system has it (`apt install libtcmalloc-minimal4`):
SpineNet-49's COCO training steps 5-15% faster, and the demo's step at
106-108 ms where glibc gave 109-191 ms, depending on how its heap happened
to fragment (benchmarks/README.md, "tcmalloc"). The
`SPINENET_JAX_MALLOC` environment variable picks: 'auto' (default: tcmalloc
if found), 'tcmalloc' (required), 'glibc' (never).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.cache
def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring).

  Returns whether it did: False where the C library is not glibc (macOS,
  musl), which keep freed memory differently or not at all, and where
  another malloc (tcmalloc, jemalloc) is preloaded.
  """
  if preloaded_allocator():  # tcmalloc or jemalloc: glibc's malloc unused.
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


ENV = 'SPINENET_JAX_MALLOC'
CHOICES = ('auto', 'tcmalloc', 'glibc')
_TCMALLOC = ('tcmalloc_minimal', 'tcmalloc')  # gperftools' library names.
_PRELOADED = ('libtcmalloc', 'libjemalloc', 'libmimalloc')
_REEXEC = 'SPINENET_JAX_MALLOC_REEXEC'  # Set in the restarted process.


def find_tcmalloc() -> str | None:
  """The name of gperftools' tcmalloc library, or None where it is absent."""
  for name in _TCMALLOC:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def preloaded_allocator() -> str | None:
  """The path of a non-glibc malloc mapped into this process, or None."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as maps:
      for line in maps:
        path = line.split()[-1]
        if os.path.basename(path).startswith(_PRELOADED):
          return path
  except OSError:
    pass
  return None


def _tcmalloc_env(env: dict[str, str], library: str) -> dict[str, str]:
  """`env` with `library` preloaded and tcmalloc's large-allocation report
  off (XLA's temporaries, 3.2 GiB at 640 px, would print one at every step
  until tcmalloc's threshold passes them)."""
  preload = ' '.join(p for p in (library, env.get('LD_PRELOAD')) if p)
  return dict(env, LD_PRELOAD=preload, **{
      'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD':
          env.get('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(1 << 40))})


def choice() -> str:
  """The `SPINENET_JAX_MALLOC` environment variable, checked."""
  value = os.environ.get(ENV, 'auto') or 'auto'
  if value not in CHOICES:
    raise ValueError(f'{ENV}={value!r}: expected one of {CHOICES}.')
  return value


def run_under_tcmalloc(argv: list[str] | None = None) -> None:
  """Starts this program again with tcmalloc preloaded, when it should.

  Does nothing where `SPINENET_JAX_MALLOC` is 'glibc', where another malloc
  is already loaded, after one restart, or (with 'auto') where the system
  has no tcmalloc; with 'tcmalloc' that last case raises. Otherwise it
  replaces the process (`os.execve`) with the same interpreter and `argv`
  (default: this process's command line): call it first, before anything
  worth keeping happens, as `train.py` does.
  """
  mode = choice()
  if mode == 'glibc' or os.environ.get(_REEXEC) or preloaded_allocator():
    return
  library = find_tcmalloc()
  if library is None:
    if mode == 'tcmalloc':
      raise RuntimeError(
          f'{ENV}=tcmalloc, but no tcmalloc library was found. Install '
          "gperftools' (Debian/Ubuntu: apt install libtcmalloc-minimal4; "
          f'Fedora: dnf install gperftools-libs) or set {ENV}=auto.')
    return
  argv = list(sys.orig_argv[1:] if argv is None else argv)
  env = dict(_tcmalloc_env(dict(os.environ), library), **{_REEXEC: '1'})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv], env)


def describe(kept: bool = False) -> str:
  """One line for a log: which malloc serves this process's host memory.

  `kept`: whether `keep_freed_memory()` was applied.
  """
  other = preloaded_allocator()
  if other:
    return f'Host memory: {os.path.basename(other)}.'
  line = 'Host memory: glibc malloc' + (', freed memory kept' if kept else '')
  if sys.platform.startswith('linux') and choice() != 'glibc':
    line += ('; under tcmalloc CPU training runs 5-30% faster (apt install '
             'libtcmalloc-minimal4; spinenet_jax/host_memory.py)')
  return line + '.'
