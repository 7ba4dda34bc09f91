"""Spatial partitioning across processes, end to end through `train.py`.

Two `jax.distributed` processes x 4 CPU devices train the tests' tiny demo
model (tests/tiny.py) at 256 px for a few steps twice: with
`config.mesh.model=2` (each image's height split over 2 devices, the pairs
of devices on 'data') and data-parallel (`mesh.model=1`), on the same data
and the same processes. Prints the per-step losses of both, their largest
relative difference and the final AP; exits 1 if they differ by more than
1e-5 relative.

  python benchmarks/pod_two_process.py [--workdir DIR] [--steps 4]

Too slow for the test suite (four train.py processes, about 3 minutes on 2
cores); tests/test_pod.py checks one partitioned step in one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import tempfile
import time

import faults  # benchmarks/, beside this script: Run, free_port, metrics
from tests import tiny  # faults puts the repository on sys.path


def _two_processes(root: Path, name: str, overrides: dict) -> list:
  address = f'--coordinator_address=127.0.0.1:{faults.free_port()}'
  return [faults.Run(root, root / name, f'{name}.p{i}', overrides, address,
                     '--num_processes=2', f'--process_id={i}',
                     '--num_cpu_devices=4') for i in (0, 1)]


def _losses_and_ap(workdir: Path) -> tuple[dict[int, float], float | None]:
  """{step: training loss} and the last evaluation's AP of a run."""
  records = faults.metrics(workdir)
  aps = [r['AP'] for r in records if 'AP' in r]
  return ({r['step']: r['loss'] for r in records if 'loss' in r},
          aps[-1] if aps else None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--steps', type=int, default=4)
  args = parser.parse_args()
  root = Path(args.workdir or tempfile.mkdtemp(prefix='pod2_'))
  root.mkdir(parents=True, exist_ok=True)
  print(f'Scratch: {root}; load: {os.getloadavg()[0]:.2f} on '
        f'{os.cpu_count()} cores', flush=True)
  overrides = {**tiny.TINY_DEMO, 'data.shapes_image_size': 256,
               'data.image_size': 256, 'total_steps': args.steps,
               'checkpoint_every_steps': args.steps,
               'optimizer.ema_decay': 0.0,
               'optimizer.base_learning_rate': 0.064}
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from input_pipeline import common  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  common.get_builder(tiny.load_config(
      'demo', {**overrides, 'data.data_dir': str(root / 'tfds')}).data)
  results = {}
  for name, k in (('partitioned', 2), ('data_parallel', 1)):
    runs = _two_processes(root, name, {**overrides, 'mesh.model': k})
    codes = [run.wait() for run in runs]
    if codes != [0, 0]:
      sys.exit(f'{name}: exit codes {codes}; see {runs[0].log_path}')
    results[name] = _losses_and_ap(root / name)
    print(f'{name} (mesh.model={k}): {time.time() - runs[0].t0:.0f} s, '
          f'AP {results[name][1]}', flush=True)
  (part, part_ap), (ref, ref_ap) = (results['partitioned'],
                                    results['data_parallel'])
  worst = max(abs(part[s] - ref[s]) / abs(ref[s]) for s in ref)
  for step in sorted(ref):
    print(f'  step {step}: loss {part[step]:.7f} (model=2) '
          f'{ref[step]:.7f} (model=1)')
  ok = sorted(part) == sorted(ref) and worst <= 1e-5
  print(f'{"ok" if ok else "FAIL"}: largest relative loss difference '
        f'{worst:.2e} over {len(ref)} steps; AP {part_ap} vs {ref_ap}')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
