"""Training throughput and inference latency on an accelerator (or CPU).

  python benchmarks/accelerator.py            # the full table (a GPU/TPU)
  python benchmarks/accelerator.py --quick    # small cases, < 5 min on CPU

Training: our real RetinaNet step (`vs_model_garden.build_program`: the
COCO recipe, on-device targets, focal + Huber, weight decay, SGD momentum),
data-parallel over every local device, in `--dtype` (bfloat16 by default),
for SpineNet-49@640 at per-device batch 8/16/32, 96@1024 and 190@1280 at
4/8. Prints step time (median after compilation), images/s, MFU (3x the
forward multiply-adds counted by `spinenet_jax.summary`, 2 FLOPs each, over
the chip's peak), peak device memory, and the first call's time
(compilation). Inference: forward + box decoding + NMS at batch 1 and 8.
A case that runs out of memory is reported as OOM and the run goes on.
"""

from __future__ import annotations

import argparse
import time

import jax

import vs_model_garden  # benchmarks/, beside this script


# Dense peak TFLOP/s per chip in bfloat16 (vendor data sheets), by
# `device_kind` prefix; override with --peak_tflops.
PEAK_BF16_TFLOPS = {
    'NVIDIA H200': 989.0, 'NVIDIA H100': 989.0, 'NVIDIA A100': 312.0,
    'NVIDIA L4': 121.0, 'TPU v4': 275.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0,
    'TPU v6 lite': 918.0,
}
FULL_TRAIN = [('49', 640, (8, 16, 32)), ('96', 1024, (4, 8)),
              ('190', 1280, (4, 8))]
FULL_INFER = [('49', 640, (1, 8)), ('96', 1024, (1, 8)), ('190', 1280, (1, 8))]
QUICK_TRAIN = [('49S', 256, (2,))]
QUICK_INFER = [('49S', 256, (1,))]


def _peak_tflops(flag: float | None) -> float | None:
  if flag:
    return flag
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_TFLOPS.items()
               if kind.startswith(k)), None)


def _peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def _time(fn, args, advance, iters: int) -> tuple[float, float]:
  """(first call seconds, median seconds of `iters` further calls)."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    args = advance(out, args)
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, sorted(times)[len(times) // 2]


def _macs(model_id: str, size: int) -> int:
  import spinenet_jax as snj  # pylint: disable=g-import-not-at-top
  from spinenet_jax import summary  # pylint: disable=g-import-not-at-top
  return summary.summarize(snj.RetinaNet(model_id=model_id, num_classes=91),
                           size)['macs']


def _run(label: str, build, iters: int) -> tuple | None:
  try:
    fn, args, advance = build()
    return _time(fn, args, advance, iters)
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
      print(f'| {label} | OOM |')
      return None
    raise


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--quick', action='store_true',
                 help='Small cases only (a CPU check in a few minutes).')
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--iters', type=int, default=None)
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='Chip peak TFLOP/s in --dtype (default: by device).')
  args = p.parse_args()
  iters = args.iters or (3 if args.quick else 10)
  n = jax.local_device_count()
  peak = _peak_tflops(args.peak_tflops)
  print(f'{n} x {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{args.dtype}, peak {peak or "unknown"} TFLOP/s per chip, '
        f'jax {jax.__version__}')

  print('\n| training | step s | images/s | MFU | peak GiB/device | '
        'first call s |')
  print('|---|---|---|---|---|---|')
  for model_id, size, batches in QUICK_TRAIN if args.quick else FULL_TRAIN:
    macs = _macs(model_id, size)
    for per_device in batches:
      label = f'{model_id}@{size}, {per_device}/device x {n}'
      res = _run(label, lambda: vs_model_garden.build_program(
          'train', model_id, size, per_device * n, args.dtype), iters)
      if res is None:
        continue
      first, step = res
      images = per_device * n / step
      mfu = (f'{100 * 6 * macs * images / (peak * 1e12 * n):.1f}%'
             if peak else '-')
      mem = _peak_memory_gib()
      print(f'| {label} | {step:.3f} | {images:.1f} | {mfu} | '
            f'{"-" if mem is None else f"{mem:.1f}"} | {first:.0f} |',
            flush=True)

  print('\n| inference + post-processing | latency ms | images/s | '
        'first call s |')
  print('|---|---|---|---|')
  for model_id, size, batches in QUICK_INFER if args.quick else FULL_INFER:
    for batch in batches:
      label = f'{model_id}@{size}, batch {batch}'
      res = _run(label, lambda: vs_model_garden.build_program(
          'infer', model_id, size, batch, args.dtype), iters)
      if res is not None:
        first, t = res
        print(f'| {label} | {t * 1e3:.1f} | {batch / t:.1f} | {first:.0f} |',
              flush=True)


if __name__ == '__main__':
  main()
