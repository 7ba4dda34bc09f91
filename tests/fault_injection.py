"""Ways to damage a saved checkpoint, shared by test_faults.py and
benchmarks/faults.py. Each takes `WORKDIR/checkpoints/<step>`."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def truncate_arrays(step_dir: str, n: int = 3) -> None:
  """Truncates the `n` largest array data files to 10 bytes (a full disk).

  The largest: a small data file may hold only B-tree nodes that a later
  write superseded, whose damage nothing reads.
  """
  files = sorted(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*',
                                        'd', '*')), key=os.path.getsize,
                 reverse=True)
  assert len(files) >= n, files
  for f in files[:n]:
    os.truncate(f, 10)


def delete_metadata(step_dir: str) -> None:
  """Removes the tree metadata (a partial copy)."""
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def garbage_manifest(step_dir: str) -> None:
  """Overwrites the OCDBT manifest with bytes of the same length."""
  path = Path(step_dir, 'state', 'manifest.ocdbt')
  path.write_bytes(b'\xde\xad' * (path.stat().st_size // 2 + 1))


def uncommitted(step_dir: str) -> None:
  """Removes Orbax's commit marker (a save that never finished)."""
  os.remove(os.path.join(step_dir, 'commit_success.txt'))


DAMAGE = {'truncated_arrays': truncate_arrays,
          'deleted_metadata': delete_metadata,
          'garbage_manifest': garbage_manifest,
          'uncommitted': uncommitted}
