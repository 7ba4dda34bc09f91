"""Input pipeline throughput on this CPU (images per second).

Prints images per second of wall-clock time (what training sees; all cores,
tf.data autotuned) and per second of this process's CPU time (less
sensitive to other jobs on a shared machine).

Runs the detection training pipeline at 640x640 and the classification
training pipeline at 224x224 over the built-in shapes data: once with the
default 256x256 source images, and once with larger JPEGs like COCO
(480..640 px a side) and ImageNet (333..500 px), whose decoding dominates.
The datasets are built (once) into --data_dir; nothing is downloaded.

  python benchmarks/input_speed.py [--data_dir DIR] [--batches 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # pylint: disable=g-import-not-at-top

from configs import common as config_common
from input_pipeline import classification
from input_pipeline import common
from input_pipeline import detection

# (task, network size, generated source size or None for the default, label)
CASES = [
    ('detection', 640, None, 'shapes 256x256 JPEG'),
    ('detection', 640, (480, 640), 'COCO-sized JPEG, 480..640 px'),
    ('classification', 224, None, 'shapes 256x256 JPEG'),
    ('classification', 224, (333, 500), 'ImageNet-sized JPEG, 333..500 px'),
]


def _measure(task: str, size: int, source: tuple[int, int] | None,
             args: argparse.Namespace) -> tuple[float, float]:
  """Returns (images per wall-clock second, images per CPU second)."""
  # Untyped copy: `shapes_image_size` may be a (min, max) pair here.
  cfg = ml_collections.ConfigDict(
      config_common.data_config(f'shapes/{task}').to_dict())
  cfg.data_dir = args.data_dir
  cfg.image_size = size
  cfg.num_train_examples = args.num_images
  cfg.num_eval_examples = 8
  cfg.shapes_image_size = source
  cfg.shuffle_buffer = args.num_images
  module = detection if task == 'detection' else classification
  common.get_builder(cfg)  # Build outside the timing.
  it = module.train_iterator(cfg, batch_size=args.batch_size, seed=0,
                             process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  wall, cpu = [], []
  for _ in range(args.trials):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(it)
    images = args.batches * args.batch_size
    wall.append(images / (time.perf_counter() - start))
    cpu.append(images / (time.process_time() - start_cpu))
  # Best window: least disturbed by other processes on a shared machine.
  return max(wall), max(cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.path.join(
      tempfile.gettempdir(), 'spinenet_jax_bench_tfds'))
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--trials', type=int, default=3)
  args = parser.parse_args()
  print(f'CPU cores: {os.cpu_count()}; batch {args.batch_size}, '
        f'best of {args.trials} windows of {args.batches} batches after '
        f'{args.warmup} warm-up batches')
  for task, size, source, label in CASES:
    rate, per_cpu = _measure(task, size, source, args)
    print(f'{task:>14} train {size}x{size} from {label:<34} '
          f'{rate:7.1f} images/s ({per_cpu:6.1f} per CPU-second)', flush=True)


if __name__ == '__main__':
  main()
