"""Per-device memory and collectives of the compiled train step (not run).

  python benchmarks/pod_memory.py [--cases=49@640:2:none:1,...] [--devices=8]
  python benchmarks/pod_memory.py --halo=49@512x512:2,49@512x1024:2,...
  python benchmarks/pod_memory.py --fit=rows1.md,rows2.md

Each case is MODEL@SIZE:PER_DEVICE_BATCH:REMAT:MESH_MODEL[:CONV_IMPL]
(`auto` by default: im2col for small maps on CPU); the COCO recipe's
train step (bfloat16 unless --dtype) is lowered on abstract inputs over
--devices simulated CPU devices and compiled, and XLA's memory analysis and
the partitioned HLO's collectives are printed as one Markdown row per case.
"folded MB" is the all-reduce bytes once nested pairs are folded into one
(`step_audit.fold_nested`: what the GPU compiler's AllReduceFolder does
after partitioning and XLA:CPU does not; with `model` > 1 each gradient is
reduced over 'data' and then over 'model').
CPU compilation of the large models takes minutes per case; memory figures
do not depend on the machine's load.

`--halo` cases are MODEL@HEIGHTxWIDTH:MESH_MODEL: the model's forward and
backward (`step_audit.lower_model_gradient`; the train step takes square
images only) at one image per data shard, with XLA's convolutions (as on
GPU/TPU), with its collectives by op, to show what grows with the height
and what with the width.

`--fit` reads the Markdown rows printed by earlier runs and prints, for each
model, remat and model axis, the largest per-device batch whose total fits
16 and 32 GiB: measured where a measured batch is the answer, otherwise
extrapolated from the least-squares line through the measured batches
(temporaries are linear in the batch; arguments and outputs barely move).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np

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
  parser.add_argument('--halo', default='')
  parser.add_argument('--fit', default='')
  args = parser.parse_args()
  if args.fit:
    fit(args.fit.split(','))
    return

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  jax.config.update('jax_platforms', 'cpu')
  sys.path.insert(0, '.')
  from spinenet_jax import summary  # pylint: disable=g-import-not-at-top
  if args.halo:
    halo(args)
    return

  gib = 2.0**30
  print(f'{args.devices} CPU devices, {args.dtype}, jax {jax.__version__}')
  print('| model@size | batch/device | remat | model axis | arguments GiB | '
        'temporaries GiB | total GiB | all-reduce MB | folded MB | '
        'other collectives | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for case in args.cases.split(','):
    name, batch, remat, k, *impl = case.split(':')
    model_id, size = name.split('@')
    start = time.perf_counter()
    try:
      report = summary.memory_report(model_id, int(size), int(batch),
                                     args.dtype, remat, int(k), *impl)
    except Exception as e:  # pylint: disable=broad-except
      # One case failing (out of host memory, say) should not cost the rest.
      print(f'| {name} | {batch} | {remat} | {k} | failed: '
            f'{type(e).__name__}: {str(e)[:200]} |', flush=True)
      continue
    seconds = time.perf_counter() - start
    if impl:
      remat += f', {impl[0]} convs'
    m, c = report['memory'], dict(report['collectives'])
    reduce_mb = c.pop('all-reduce', (0, 0))[1] / 1e6
    folded = report['collectives_folded'].get('all-reduce', (0, 0))
    folded_mb = folded[1] / 1e6
    other = ', '.join(f'{op} {n} ops {b / 1e6:.1f} MB'
                      for op, (n, b) in sorted(c.items())) or '-'
    print(f'| {name} | {batch} | {remat} | {k} | {m["arguments"] / gib:.2f} '
          f'| {m["temporaries"] / gib:.2f} | {m["total"] / gib:.2f} | '
          f'{reduce_mb:.1f} | {folded_mb:.1f} | {other} | {seconds:.0f} |',
          flush=True)


def halo(args: argparse.Namespace) -> None:
  """One row per --halo case: the collectives of the forward and backward."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from spinenet_jax import step_audit  # pylint: disable=g-import-not-at-top
  print(f'{args.devices} CPU devices, {args.dtype}, jax {jax.__version__}; '
        'forward + backward, one image per data shard')
  print('| model | height x width | model axis | collective-permute | '
        'all-gather | all-to-all | all-reduce | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for case in args.halo.split(','):
    name, k = case.split(':')
    model_id, shape = name.split('@')
    height, width = (int(x) for x in shape.split('x'))
    config = common.coco_recipe(model_id, height)
    config.dtype, config.mesh.model = args.dtype, int(k)
    # XLA's convolutions, as on GPU/TPU: on CPU 'auto' picks im2col for
    # small maps, and which maps those are changes with the image shape.
    config.model.conv_impl = 'xla'
    config.batch_size = args.devices // int(k)
    start = time.perf_counter()
    compiled = step_audit.lower_model_gradient(config, height, width).compile()
    seconds = time.perf_counter() - start
    ops = step_audit.summarize(step_audit.collectives(compiled))
    cells = [f'{ops[op][0]} ops {ops[op][1] / 1e6:.2f} MB' if op in ops
             else '-' for op in ('collective-permute', 'all-gather',
                                 'all-to-all', 'all-reduce')]
    print(f'| {model_id} | {height} x {width} | {k} | {" | ".join(cells)} | '
          f'{seconds:.0f} |', flush=True)


def _largest_batch(points: list[tuple[int, float]], limit: float) -> str:
  """Largest batch whose total is <= `limit` GiB: 'N' when measurements
  bracket it exactly, '~N' when read off the fitted line."""
  batches, totals = np.array(points, float).T
  slope, base = (np.polyfit(batches, totals, 1) if len(points) > 1
                 else (totals[0] / batches[0], 0.0))
  low = max((b for b, t in points if t <= limit), default=0)
  high = min((b for b, t in points if t > limit), default=None)
  estimate = int((limit - base) // slope) if slope > 0 else low
  estimate = max(low, estimate if high is None else min(estimate, high - 1))
  exact = estimate == low and (high is None or high == low + 1 or low == 0
                               and high == 1)
  return str(estimate) if exact else f'~{estimate}'


def fit(paths: list[str]) -> None:
  """The 16 / 32 GiB table from the rows in `paths`."""
  groups = collections.defaultdict(list)
  for path in paths:
    for line in open(path):
      cells = [c.strip() for c in line.strip().strip('|').split('|')]
      if len(cells) not in (10, 11) or not cells[1].isdigit():
        continue
      groups[cells[0], cells[2], cells[3]].append((int(cells[1]),
                                                   float(cells[6])))
  print('| model@size | remat | model axis | measured batches | fits 16 GiB '
        '| fits 32 GiB |')
  print('|---|---|---|---|---|---|')
  for (name, remat, k), points in sorted(
      groups.items(), key=lambda g: (int(g[0][0].split('@')[0]), g[0][1:])):
    points = sorted(points)
    print(f'| {name} | {remat} | {k} | '
          f'{" / ".join(str(b) for b, _ in points)} | '
          f'{_largest_batch(points, 16)} | {_largest_batch(points, 32)} |')


if __name__ == '__main__':
  main()
