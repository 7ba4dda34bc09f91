"""Times `detection.postprocess.detect` on RetinaNet-shaped random outputs.

Usage: python benchmarks/postprocess.py [--image_size 640] [--batch 1 8]

91 classes, 9 anchors per location, levels 3-7 (76,725 anchors at 640).
Scenarios:
- random: logits ~ N(0, 1), so nearly all 6.9M (anchor, class) pairs pass
  the 0.05 threshold; candidates spread over 90 classes.
- one_class: only class 1 scores (N(0, 1)), all others -10: NMS within one
  class over heavily overlapping anchors.
- same_box: one class and every box decodes to the same box: one survivor,
  so NMS must scan all `pre_nms_top_k` candidates (its worst case).
Times are after compilation, median of `--repeats` runs, per image.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spinenet_jax.detection import anchors as anchors_lib
from spinenet_jax.detection import postprocess

NUM_CLASSES = 91
NUM_ANCHORS = 9


def make_outputs(scenario: str, batch: int, image_size: int, seed: int = 0):
  """Per-level head outputs `{'cls_outputs': ..., 'box_outputs': ...}`."""
  rng = np.random.default_rng(seed)
  cls, box = {}, {}
  for level, (h, w) in anchors_lib.feature_sizes(image_size).items():
    logits = rng.normal(size=(batch, h, w, NUM_ANCHORS, NUM_CLASSES))
    deltas = 0.1 * rng.normal(size=(batch, h, w, NUM_ANCHORS, 4))
    if scenario in ('one_class', 'same_box'):
      logits[..., :] = -10.0
      logits[..., 1] = rng.normal(size=(batch, h, w, NUM_ANCHORS))
    cls[level] = logits.reshape(batch, h, w, -1).astype(np.float32)
    box[level] = deltas.reshape(batch, h, w, -1).astype(np.float32)
  if scenario == 'same_box':
    # Deltas that decode every anchor to the box (100, 100, 300, 300).
    anchors = anchors_lib.multilevel_anchors(image_size)
    yc = (anchors[:, 0] + anchors[:, 2]) / 2
    xc = (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    d = np.stack([(200 - yc) / ha, (200 - xc) / wa, np.log(200 / ha),
                  np.log(200 / wa)], -1).astype(np.float32)
    start = 0
    for level, (h, w) in anchors_lib.feature_sizes(image_size).items():
      n = h * w * NUM_ANCHORS
      box[level] = np.broadcast_to(d[start:start + n].reshape(1, h, w, -1),
                                   box[level].shape).copy()
      start += n
  return cls, box


def bench(scenario: str, batch: int, image_size: int, repeats: int,
          vectorize=None, tile_size: int = 256):
  anchors = anchors_lib.multilevel_anchors(image_size)
  cls, box = make_outputs(scenario, batch, image_size)
  cls, box = jax.device_put((cls, box))
  fn = jax.jit(lambda c, b: postprocess.detect(
      c, b, anchors, image_size, vectorize=vectorize, tile_size=tile_size))
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(cls, box))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(cls, box))
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times)) / batch
  dets = np.asarray(out['num_detections'])
  print(f'{scenario:10s} batch {batch:2d}: {ms:8.1f} ms/image  '
        f'(first call incl. compile {compile_s:5.1f} s, detections/image '
        f'{dets.min()}-{dets.max()})', flush=True)
  return ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=640)
  parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--scenario', nargs='+',
                      default=['random', 'one_class', 'same_box'])
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--vectorize', choices=['auto', 'true', 'false'],
                      default='auto', help='detect(vectorize=...): vmap or '
                      'loop over images (auto: loop on CPU)')
  parser.add_argument('--tile_size', type=int, default=256)
  args = parser.parse_args()
  vectorize = {'auto': None, 'true': True, 'false': False}[args.vectorize]
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s), {os.cpu_count()} CPU cores; '
        f'{args.image_size}x{args.image_size}, '
        f'{len(anchors_lib.multilevel_anchors(args.image_size))} anchors, '
        f'{NUM_CLASSES} classes, vectorize={args.vectorize}, '
        f'tile_size={args.tile_size}')
  for scenario in args.scenario:
    for batch in args.batch:
      bench(scenario, batch, args.image_size, args.repeats, vectorize,
            args.tile_size)


if __name__ == '__main__':
  main()
