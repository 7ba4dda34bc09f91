"""Per-device memory and collectives of the compiled train step (not run).

  python benchmarks/pod_memory.py [--cases=49@640:2:none:1,...] [--devices=8]

Each case is MODEL@SIZE:PER_DEVICE_BATCH:REMAT:MESH_MODEL; the COCO recipe's
train step (bfloat16 unless --dtype) is lowered on abstract inputs over
--devices simulated CPU devices and compiled, and XLA's memory analysis and
the partitioned HLO's collectives are printed as one Markdown row per case.
CPU compilation of the large models takes minutes per case; memory figures
do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_CASES = ','.join([
    '49@640:2:none:1', '49@640:2:blocks:1',
    '49@1024:2:none:1', '49@1024:2:none:2', '49@1024:2:none:4',
    '96@1024:2:none:1', '96@1024:2:blocks:1',
    '143@1280:1:none:1', '143@1280:1:blocks:1',
    '190@1280:1:none:1', '190@1280:1:blocks:1', '190@1280:1:none:2'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=DEFAULT_CASES)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--dtype', default='bfloat16')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  jax.config.update('jax_platforms', 'cpu')
  sys.path.insert(0, '.')
  from spinenet_jax import summary  # pylint: disable=g-import-not-at-top

  gib = 2.0**30
  print(f'{args.devices} CPU devices, {args.dtype}, jax {jax.__version__}')
  print('| model@size | batch/device | remat | model axis | arguments GiB | '
        'temporaries GiB | total GiB | all-reduce MB | other collectives | '
        'compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for case in args.cases.split(','):
    name, batch, remat, k = case.split(':')
    model_id, size = name.split('@')
    start = time.perf_counter()
    report = summary.memory_report(model_id, int(size), int(batch),
                                   args.dtype, remat, int(k))
    seconds = time.perf_counter() - start
    m, c = report['memory'], dict(report['collectives'])
    reduce_mb = c.pop('all-reduce', (0, 0))[1] / 1e6
    other = ', '.join(f'{op} {n} ops {b / 1e6:.1f} MB'
                      for op, (n, b) in sorted(c.items())) or '-'
    print(f'| {name} | {batch} | {remat} | {k} | {m["arguments"] / gib:.2f} '
          f'| {m["temporaries"] / gib:.2f} | {m["total"] / gib:.2f} | '
          f'{reduce_mb:.1f} | {other} | {seconds:.0f} |', flush=True)


if __name__ == '__main__':
  main()
