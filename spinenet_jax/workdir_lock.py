"""One trainer per workdir: a lock that names its holder.

Process 0 of a run holds an exclusive `fcntl.flock` on `WORKDIR/.lock` for
the whole run and writes who holds it (host, pid, start time, command) to
`WORKDIR/lock.json`. The kernel releases the flock when the holder dies
however it dies, so a `lock.json` whose flock is free is stale: its process
is gone, and the next trainer takes the lock over with a warning. A second
trainer on a live run's workdir is refused with the holder's details. flock
is honoured by local filesystems and NFSv4; on filesystems without it
(some FUSE mounts) the lock is advisory only.

Multi-process runs hold one lock per run (process 0's); every process
learns whether it was granted, so all of them stop together when it was not.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

import jax

from spinenet_jax import multihost

LOCK_FILE = '.lock'
HOLDER_FILE = 'lock.json'


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(
              timespec='seconds'),
          'command': ' '.join(sys.argv)}


def _describe(holder: dict | None) -> str:
  if not holder:
    return 'a process that left no details'
  return (f'pid {holder.get("pid")} on host {holder.get("host")}, started '
          f'{holder.get("started")} ({holder.get("command", "")})')


def read_holder(workdir: str) -> dict | None:
  """The details `lock.json` holds, or None (no file, or unreadable)."""
  try:
    with open(os.path.join(workdir, HOLDER_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for one run."""

  def __init__(self, workdir: str, warn=print):
    self.workdir, self.warn = os.path.abspath(workdir), warn
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    error = self._acquire() if jax.process_index() == 0 else None
    if multihost.any_process(error is not None):
      self.release()
      raise WorkdirLockedError(error or 'Process 0 could not lock the '
                               f'workdir {self.workdir}; see its log.')
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _acquire(self) -> str | None:
    """Takes the lock; the refusal message when another run holds it."""
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(os.path.join(self.workdir, LOCK_FILE),
                 os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      return (f'Workdir {self.workdir} is in use by another trainer: '
              f'{_describe(read_holder(self.workdir))}. Stop that run first, '
              'or train into another --workdir.')
    self._fd = fd
    stale = read_holder(self.workdir)
    if stale is not None:
      self.warn(f'WARNING: taking over the stale lock of {self.workdir}: '
                f'{_describe(stale)} is no longer running.')
    path = os.path.join(self.workdir, HOLDER_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(_holder(), f)
    os.replace(path + '.tmp', path)
    return None

  def release(self) -> None:
    """Removes `lock.json` and frees the flock (if held; idempotent)."""
    if self._fd is None:
      return
    try:
      os.remove(os.path.join(self.workdir, HOLDER_FILE))
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
