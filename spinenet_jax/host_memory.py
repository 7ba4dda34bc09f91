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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.cache
def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring).

  Returns whether it did: False where the C library is not glibc (macOS,
  musl), which keep freed memory differently or not at all.
  """
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
