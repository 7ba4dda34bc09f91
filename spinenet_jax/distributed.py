"""Joining and leaving a multi-process run, and stopping when a peer dies.

By default a JAX process whose peer dies aborts with a native stack dump
once the coordination service notices the missing heartbeats (100 s by
default): the client's error callback is fatal and cannot be replaced from
Python (`jax.distributed.initialize` does not expose it, and the binding
cannot pass its status to a Python callable). So `initialize` turns on the
runtime's recoverability (`jax_enable_recoverability`: the service no
longer tells the survivors to abort) with a shorter heartbeat timeout, and
a thread asks the service which processes are still alive
(`get_live_nodes`, the runtime's own heartbeat bookkeeping) every
`POLL_S`. When one is gone, every survivor prints one line that names it
and the step a restart resumes from, and exits with 1. A collective that
fails first (gloo's "Connection closed by peer" on CPU) is held back by
`await_lost_peer` until the watcher has decided.

Recoverable processes do not wait for each other at shutdown, so
`shutdown` does: a barrier, then process 0 (which hosts the service) waits
until the others have disconnected *and received the reply*, before it
stops the service. The service marks a process gone when its disconnect
request arrives, before it replies; stopping the service in between cancels
the reply and that process aborts (seen under load, even 2 s later). So
each other process holds a TCP connection to process 0 (its port handed
over in the service's key-value store) and closes it once its disconnect
has returned (or the OS closes it when the process dies): process 0 stops
the service when every connection is closed. A process that cannot connect
(a firewall between hosts) is waited for as before: until the service
counts it gone, then `SHUTDOWN_GRACE_S`.

Limitation: when process 0 itself dies, the service dies with it and the
survivors' clients usually abort at once (0.3 s; SIGABRT, exit -6) with
JAX's message ("the leader task was preempted/died") followed by absl's
Python thread dump; that path is inside the runtime's client, whose error
callback cannot be replaced from Python. In 1 of 6 tries the watcher
was first and printed its line with exit 1.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time
from typing import NoReturn

import jax
from jax._src import distributed as jax_distributed

from spinenet_jax import quiet_restore

HEARTBEAT_TIMEOUT_S = 30  # A process silent this long counts as dead.
POLL_S = 1.0
SHUTDOWN_TIMEOUT_S = 300  # How long processes wait for each other at exit.
# After the service counts a process that could not link to process 0 as
# gone, how long process 0 waits for that process's disconnect reply.
SHUTDOWN_GRACE_S = 2.0
_BARRIER = 'spinenet_jax_shutdown'
_PORT_KEY = 'spinenet_jax_shutdown_port'  # Process 0's shutdown socket.

_stop_watching = threading.Event()
_heartbeat_timeout_s = [HEARTBEAT_TIMEOUT_S]


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *, workdir: str | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """`jax.distributed.initialize`, then watches the peers (see above).

  With no arguments the cluster is auto-detected (TPU pods, SLURM, MPI).
  `workdir` is where a restart would resume from (named in the message).
  """
  if heartbeat_timeout_s < 2 * POLL_S:
    raise ValueError(f'heartbeat_timeout_s={heartbeat_timeout_s} is too '
                     f'short; use at least {int(2 * POLL_S)} (default '
                     f'{HEARTBEAT_TIMEOUT_S}).')
  jax.config.update('jax_enable_recoverability', True)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  _heartbeat_timeout_s[0] = heartbeat_timeout_s
  if jax.process_count() > 1:
    _stop_watching.clear()
    threading.Thread(target=_watch, args=(workdir, heartbeat_timeout_s),
                     name='peer_watch', daemon=True).start()


def _client():
  return jax_distributed.global_state.client


def _watch(workdir: str | None, timeout_s: int) -> None:
  everyone = list(range(jax.process_count()))
  client = _client()
  while not _stop_watching.wait(POLL_S):
    reason = f'no heartbeat for {timeout_s} s'
    try:
      live = set(client.get_live_nodes(everyone))
    except Exception:  # pylint: disable=broad-except  # The service is gone.
      live, reason = set(everyone) - {0}, 'its coordination service is gone'
    lost = sorted(set(everyone) - live)
    if lost and not _stop_watching.is_set():
      exit_with(peer_lost_message(lost, len(everyone), jax.process_index(),
                                  workdir, reason), leave_together=False)


def peer_lost_message(lost: list[int], count: int, me: int,
                      workdir: str | None, reason: str) -> str:
  """'process 1 of 2 stopped responding ...; restarting all processes
  resumes from step N'."""
  which = ', '.join(map(str, lost))
  noun = 'process' if len(lost) == 1 else 'processes'
  text = (f'{noun} {which} of {count} stopped responding ({reason}: '
          f'killed, crashed or cut off), so process {me} stops too. ')
  if workdir is None:
    return text + 'Restart all processes.'
  from spinenet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    steps = checkpoints.saved_steps(workdir)
  except Exception:  # pylint: disable=broad-except  # Unreadable: say so.
    steps = None
  if steps:
    where = (f'resumes from step {steps[-1]}, the last complete checkpoint '
             f'in {checkpoints.checkpoint_dir(workdir)}')
  elif steps is None:
    where = f'resumes from the last complete checkpoint in {workdir}'
  else:
    where = 'starts from step 0 (no complete checkpoint yet)'
  return text + f'Restarting all processes with the same flags {where}.'


def exit_with(message: str, leave_together: bool = True) -> NoReturn:
  """Prints 'train.py: <message>' as the last line and exits with 1.

  No traceback, and no interpreter teardown: tensorstore reads that a
  failed checkpoint restore abandoned would print tracebacks from it. With
  `leave_together` (the other processes fail the same way) the processes
  first leave the run together (`shutdown`, 60 s at most).
  """
  sys.stdout.flush()
  os.write(quiet_restore.silence(), f'train.py: {message}\n'.encode())
  if leave_together:
    shutdown(timeout_s=60)
  os._exit(1)  # pylint: disable=protected-access


def await_lost_peer() -> None:
  """Call when a collective failed (CPU collectives fail at once when a
  peer's connection closes): if a peer died, the watcher ends this process
  with its message within the heartbeat timeout; if none did, returns."""
  if jax.process_count() > 1 and not _stop_watching.is_set():
    _stop_watching.wait(_heartbeat_timeout_s[0] + 3 * POLL_S)


def shutdown(timeout_s: int = SHUTDOWN_TIMEOUT_S) -> None:
  """Leaves the run together with the other processes (a no-op alone).

  Returns after `timeout_s` at most (plus the grace) even if some never
  arrive.
  """
  client = _client()
  if client is None or jax.process_count() == 1:
    return
  _stop_watching.set()
  deadline = time.monotonic() + timeout_s
  link = None
  try:
    if jax.process_index() == 0:  # The service must outlive the others.
      with _listen() as server:
        client.key_value_set(_PORT_KEY, str(server.getsockname()[1]), True)
        client.wait_at_barrier(_BARRIER, timeout_s * 1000)
        _wait_for_others(client, server, deadline)
    else:
      link = _link_to_process_0(client, timeout_s)
      client.wait_at_barrier(_BARRIER, timeout_s * 1000)
  except Exception:  # pylint: disable=broad-except  # A peer never came.
    pass
  jax.distributed.shutdown()
  if link is not None:
    link.close()  # Tells process 0 that this process's disconnect is done.


def _linked_key(process: int) -> str:
  return f'spinenet_jax_shutdown_linked_{process}'


def _listen() -> socket.socket:
  if socket.has_dualstack_ipv6():
    return socket.create_server(('', 0), family=socket.AF_INET6,
                                dualstack_ipv6=True)
  return socket.create_server(('', 0))


def _coordinator_host() -> str:
  address = jax_distributed.global_state.coordinator_address or ''
  return address.rsplit(':', 1)[0].strip('[]') or 'localhost'


def _link_to_process_0(client, timeout_s: int) -> socket.socket | None:
  """Connects to process 0's shutdown socket and says whether it could."""
  link = None
  try:
    port = int(client.blocking_key_value_get(_PORT_KEY, timeout_s * 1000))
    link = socket.create_connection((_coordinator_host(), port), timeout=10)
  except OSError:
    link = None  # Unreachable: process 0 falls back to the grace period.
  client.key_value_set(_linked_key(jax.process_index()),
                       '1' if link else '0', True)
  return link


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception:  # pylint: disable=broad-except  # Not set: never came.
    return None


def _receive(conn: socket.socket) -> bytes:
  try:
    return conn.recv(64)
  except OSError:  # Reset by a peer that died: done all the same.
    return b''


def _wait_for_others(client, server: socket.socket, deadline: float) -> None:
  """After the barrier: waits until every linked process closed its
  connection, and every unlinked one is gone from the service plus grace."""
  others = list(range(1, jax.process_count()))
  linked = [p for p in others if _try_get(client, _linked_key(p)) == '1']
  unlinked = sorted(set(others) - set(linked))
  with selectors.DefaultSelector() as selector:
    server.setblocking(False)
    selector.register(server, selectors.EVENT_READ)
    closed = 0
    while closed < len(linked) and time.monotonic() < deadline:
      for key, _ in selector.select(timeout=0.5):
        if key.fileobj is server:
          conn, _ = server.accept()
          selector.register(conn, selectors.EVENT_READ)
        elif not _receive(key.fileobj):  # Closed: that peer is done.
          selector.unregister(key.fileobj)
          key.fileobj.close()
          closed += 1
  if unlinked:
    while (client.get_live_nodes(unlinked) and
           time.monotonic() < deadline):
      time.sleep(0.05)
    time.sleep(SHUTDOWN_GRACE_S)
