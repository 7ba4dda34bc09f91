"""Export table: every format of a run, its size, difference to JAX and
CPU latency at batch 1; and the int8 TFLite model's AP drop.

  python benchmarks/export.py --workdir=runs/demo [--output=runs/export_bench]
      [--formats=jax,savedmodel,tflite] [--ap_images=500]

Each artifact is written with `spinenet_jax.export.export_run` (which checks
it against JAX on 4 shapes validation images) and timed at batch 1 on one
fixed image (median of `--repeats` calls after 3 warm-up calls) next to the
JAX model itself, in this one process. The AP rows run the float and the
int8 TFLite models of `--what=raw` and decode and NMS their outputs with the
library's `postprocess.detect`, on the shapes validation split, and score
them with the library's COCO evaluator. ONNX needs `make onnx`'s
environment: run this script with `.venv-onnx/bin/python` to add its rows.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinenet_jax import evaluation  # noqa: E402
from spinenet_jax import export  # noqa: E402
from spinenet_jax import export_report  # noqa: E402
from spinenet_jax import inference  # noqa: E402
from spinenet_jax.detection import postprocess  # noqa: E402

CASES = {  # format -> the graphs and quantizations it is measured with.
    'jax': [('detector', 'none'), ('raw', 'none')],
    'savedmodel': [('detector', 'none')],
    'tflite': [('detector', 'none'), ('raw', 'none'), ('raw', 'dynamic'),
               ('raw', 'int8')],
    'onnx': [('raw', 'none'), ('backbone', 'none')],  # No NMS in ONNX.
}


def median_ms(fn, image: np.ndarray, repeats: int) -> float:
  for _ in range(3):
    fn(image)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(image))
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def runner_of(fmt: str, directory: str):
  """A batch-1 runner of a written artifact, loaded from disk."""
  if fmt == 'jax':
    from spinenet_jax import export_loader  # pylint: disable=g-import-not-at-top
    return export_loader.load(directory)
  if fmt == 'savedmodel':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    sig = tf.saved_model.load(os.path.join(directory, 'saved_model')
                              ).signatures['serving_default']
    return lambda x: {k: v.numpy() for k, v in sig(images=tf.constant(x)
                                                  ).items()}
  if fmt == 'tflite':
    from spinenet_jax import export_tf  # pylint: disable=g-import-not-at-top
    return export_tf.tflite_runner(os.path.join(directory, 'model.tflite'))[0]
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(
      os.path.join(directory, 'model.onnx'),
      providers=['CPUExecutionProvider'])
  return lambda x: session.run(None, {'images': x})


def shapes_ap(run: inference.Run, raw_runner, n: int) -> dict[str, float]:
  """COCO AP of a raw-output runner on the first n validation images."""
  from input_pipeline import shapes  # pylint: disable=g-import-not-at-top
  cfg = shapes.make_config('detection')
  size, ec = run.image_size, run.config.eval
  anchors = run.model.anchors(size)
  detect = jax.jit(lambda cls, box: postprocess.detect(
      cls, box, anchors, (size, size), pre_nms_top_k=ec.pre_nms_top_k,
      score_threshold=ec.score_threshold, iou_threshold=ec.iou_threshold,
      max_detections=ec.max_detections))
  evaluator = evaluation.CocoEvaluator(sorted(run.labels))
  from spinenet_jax import export_loader  # pylint: disable=g-import-not-at-top
  levels = range(run.model.min_level, run.model.max_level + 1)
  for i in range(n):
    ex = shapes.render(cfg, 'validation', i)
    image, scale = export_loader.fit_image(ex['image'], size,
                                           export_report.PAD_RGB)
    out = raw_runner(image[None])
    det = jax.device_get(detect(
        {l: out[f'cls_outputs_l{l}'] for l in levels},
        {l: out[f'box_outputs_l{l}'] for l in levels}))
    det['boxes'] = det['boxes'] / scale
    h, w = ex['image'].shape[:2]
    evaluator.add(det, {'image_id': [i], 'boxes': ex['boxes'][None],
                        'classes': ex['labels'][None] + 1,
                        'height': [h], 'width': [w]})
  return evaluator.result()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', default='runs/export_bench')
  p.add_argument('--formats', default='jax,savedmodel,tflite')
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--ap_images', type=int, default=500)
  args = p.parse_args()
  run = inference.load_checkpoint(args.workdir)
  image = export_report.check_images(run, export.check_request(run, 'jax'))[:1]
  rows = []
  formats = args.formats.split(',')
  for what in ('detector', 'raw') + (('backbone',) if 'onnx' in formats
                                     else ()):
    request = export.check_request(run, 'jax', what, platforms=('cpu',))
    fn = jax.jit(export.serving_function(run, request))
    variables = jax.device_get(run.variables)
    rows.append({'format': 'JAX (in process)', 'what': what,
                 'quantize': 'none', 'size': None, 'diff': None,
                 'ms': median_ms(lambda x: fn(variables, x), image,
                                 args.repeats)})
  raw_runners = {}
  for fmt in formats:
    for what, quantize in CASES[fmt]:
      out = os.path.join(args.output, f'{fmt}_{what}_{quantize}')
      info = export.export_run(run, fmt, out, what=what, quantize=quantize,
                               log=lambda _: None)
      runner = runner_of(fmt, out)
      if fmt == 'tflite' and what == 'raw':
        raw_runners[quantize] = runner
      diffs = info['max_difference_to_jax']
      diff = (f'{diffs["max_box_px"]:.2g} px, {diffs["unmatched"]} unmatched'
              if what == 'detector' else f'{max(diffs.values()):.2g} rel')
      if info.get('tflite_kernels'):
        diff += f' ({info["tflite_kernels"]})'
      rows.append({'format': fmt, 'what': what, 'quantize': quantize,
                   'size': info['size_bytes'], 'diff': diff,
                   'ms': median_ms(runner, image, args.repeats)})
      print(json.dumps(rows[-1]), flush=True)
  print(f'\nCPU {os.cpu_count()} cores, load average '
        f'{os.getloadavg()[0]:.2f}; run {args.workdir} step {run.step}\n')
  print('| format | what | quantize | size | max difference to JAX | '
        'CPU ms, batch 1 |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    size = f'{r["size"] / 1e6:.2f} MB' if r['size'] else '-'
    print(f'| {r["format"]} | {r["what"]} | {r["quantize"]} | {size} | '
          f'{r["diff"] or "-"} | {r["ms"]:.1f} |')
  if raw_runners and args.ap_images:
    print(f'\nAP on the first {args.ap_images} shapes validation images:')
    for quantize, runner in raw_runners.items():
      m = shapes_ap(run, runner, args.ap_images)
      print(f'- TFLite raw, quantize={quantize}: AP {m["AP"]:.3f}, '
            f'AP50 {m["AP50"]:.3f}', flush=True)


if __name__ == '__main__':
  main()
