"""Orbax restores that fail with one error instead of hundreds of tracebacks.

Orbax reads a checkpoint's arrays concurrently on an event loop that it
closes as soon as one read fails. Every read still in flight then fails to
call back into the closed loop, and tensorstore prints a traceback for each
("RuntimeError: Event loop is closed", often hundreds, interleaved and
possibly minutes later); asyncio logs the abandoned tasks and futures as
"exception was never retrieved" when they are collected.

`read` runs a restore and returns its error as one line. Once a restore
has failed, this process's file descriptor 2 goes through a filter that
drops only the lines made of those tracebacks' fragments (and asyncio's log
and the unraisable-exception hook drop the abandoned Orbax tasks); all other
output passes. Processes whose restores succeed are left untouched.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable

_ORPHANED_READ_ERROR = re.compile('|'.join((
    r'Traceback \(most recent call last\):',
    r'File "[^"]*asyncio/base_events\.py", line \d+, in \w+',
    r"raise RuntimeError\('Event loop is closed'\)", r'self\._check_closed\(\)',
    r'RuntimeError', r'Event loop is closed', r':')))

_installed = threading.Event()
_finishers: list[Callable[[], None]] = []  # Wait for the pump to end.
_out: list[int] = []  # The real standard error, while the filter runs.


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause (e.g. tensorstore's 'Error
  reading "params.x/0.0" ...: byte range [a, b) is not valid for value of
  size 10'), which says more than the wrappers around it."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text.split('. See full TensorStore details')[0][:limit]


def is_orphaned_read_error(line: str) -> bool:
  """True for a line made only of the orphaned reads' traceback fragments
  (or blank: interleaved fragments leave their line ends behind)."""
  return not _ORPHANED_READ_ERROR.sub('', line).strip()


def read(fn: Callable[[], Any]) -> tuple[Any, str | None]:
  """(fn(), None), or (None, the error in one line) when it raised.

  What `fn` writes to file descriptor 2 is held back meanwhile; after a
  failure the filter is installed before any of it is passed on.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  result, error = None, None
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      result = fn()
    except Exception as e:  # Orbax raises many types for damaged files.
      error = first_line(e)
    finally:
      sys.stderr.flush()
      if error is None:
        os.dup2(saved, 2)
      else:
        _install(saved)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode(errors='replace')
      sys.stderr.write(''.join(line for line in text.splitlines(True)
                               if not is_orphaned_read_error(line)))
      sys.stderr.flush()
  return result, error


def _install(stderr_fd: int) -> None:
  """Routes file descriptor 2 through the filter to `stderr_fd` (once)."""
  logging.getLogger('asyncio').addFilter(_drop_orphaned_tasks)
  if getattr(sys.unraisablehook, '__name__', '') != 'drop_orphaned':
    sys.unraisablehook = _drop_orphaned_coroutines(sys.unraisablehook)
  if _installed.is_set():
    return
  out = os.dup(stderr_fd)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  done = threading.Event()  # The pump ended.

  def pump():
    with os.fdopen(read_end, 'rb') as source:
      for line in source:
        if not is_orphaned_read_error(line.decode(errors='replace')):
          os.write(out, line)
    done.set()
    _installed.clear()  # fd 2 was replaced (e.g. by a test's capture).

  thread = threading.Thread(target=pump, name='quiet_restore', daemon=True)
  thread.start()
  _installed.set()

  def finish():
    """Passes on what is buffered before the interpreter exits."""
    if not done.is_set():
      sys.stderr.flush()
      os.dup2(out, 2)  # Closes the pipe's last write end: the pump ends.
      thread.join(timeout=5)

  atexit.register(finish)
  _finishers[:] = [lambda: thread.join(timeout=5)]
  _out[:] = [out]


def silence() -> int:
  """Ends the filter for good and returns a descriptor for a last message.

  For a process about to `os._exit`: fd 2 goes to /dev/null (abandoned
  reads may still print), what the filter holds is passed on, and the
  descriptor returned writes to the real standard error (2 if no filter).
  """
  sys.stderr.flush()
  if not _finishers:
    return 2
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)  # Closes the pipe's last write end: the pump ends.
  os.close(devnull)
  for wait in _finishers:
    wait()
  return _out[0] if _out else 2


def _drop_orphaned_tasks(record: logging.LogRecord) -> bool:
  """asyncio's log without the abandoned Orbax tasks' 'exception was never
  retrieved', reported whenever they are garbage-collected."""
  if 'exception was never retrieved' not in record.getMessage():
    return True
  tb = record.exc_info[2] if record.exc_info else None
  return not any('orbax' in frame.filename
                 for frame in traceback.extract_tb(tb))


def _drop_orphaned_coroutines(previous):
  """An unraisable-exception hook that drops abandoned Orbax coroutines'
  errors and passes on all others."""
  def drop_orphaned(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if 'orbax' not in getattr(code, 'co_filename', ''):
      previous(unraisable)
  return drop_orphaned
