"""What `spinenet_jax.export` measures and writes beside an artifact.

The check images (generated shapes images, never downloaded), the
comparison with the JAX model and its tolerances, and `manifest.json`
(input contract, preprocessing, label map, outputs, versions, sha256).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
from typing import Any, Callable

import numpy as np

from input_pipeline import contract
from spinenet_jax import export_loader

# The mean colour in uint8: padding with it normalises to about 0, as the
# training pipeline pads normalised images with 0.
PAD_RGB = tuple(int(round(255 * m)) for m in contract.MEAN_RGB)
# Parity tolerances of float artifacts (quantized ones are only reported).
RAW_RTOL = 1e-4
BOX_ATOL_PX = 0.5
NUM_CHECK_IMAGES = 4

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def check_images(run: Any, request: Any,
                 n: int = NUM_CHECK_IMAGES) -> np.ndarray:
  """uint8 `[n, S, S, 3]` images of the built-in shapes validation split
  (generated, never downloaded): central squares resized to the input, so
  that no padding makes detections of equal score at many places."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from input_pipeline import shapes  # pylint: disable=g-import-not-at-top
  cfg = shapes.make_config('detection' if run.is_detection
                           else 'classification')
  size = request.image_size
  out = []
  for i in range(n):
    image = shapes.render(cfg, 'validation', i)['image']
    h, w = image.shape[:2]
    c = min(h, w)
    square = image[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
    out.append(np.asarray(Image.fromarray(square).resize(
        (size, size), Image.BILINEAR)))
  return np.stack(out)


SCORE_TIE = 1e-4  # Scores this close may swap places between runtimes.


def _match(got: dict[str, np.ndarray], want: dict[str, np.ndarray], i: int
           ) -> tuple[int, float, float]:
  """One image: (want detections with no equal in got, max box and score
  difference of the matched). An equal has the same class, a box within
  BOX_ATOL_PX and a score within SCORE_TIE; detections tied (to
  SCORE_TIE) with the last kept one may be replaced by another of that
  tie, which a different runtime's rounding keeps instead."""
  n = int(want['num_detections'][i])
  if n == 0:
    return 0, 0.0, 0.0
  wb, ws, wc = (want[k][i, :n] for k in ('boxes', 'scores', 'classes'))
  gb, gs, gc = (got[k][i, :n] for k in ('boxes', 'scores', 'classes'))
  free = np.ones(n, bool)
  missing, box, score = 0, 0.0, 0.0
  for j in range(n):
    d = np.abs(gb - wb[j]).max(axis=1)
    ok = free & (gc == wc[j]) & (d <= BOX_ATOL_PX) & (
        np.abs(gs - ws[j]) <= SCORE_TIE)
    if ok.any():
      k = int(np.argmax(ok))
      free[k] = False
      box = max(box, float(d[k]))
      score = max(score, float(abs(gs[k] - ws[j])))
    elif ws[j] > ws[-1] + SCORE_TIE:
      missing += 1
  return missing, box, score


def compare(what: str, got: dict[str, np.ndarray],
            want: dict[str, np.ndarray]) -> dict[str, float]:
  """Differences of an artifact's outputs from JAX's on the same images.

  Float outputs: max |got - want| / max |want| per output. Detector:
  whether the counts are identical, how many detections have no equal
  (same class, box within BOX_ATOL_PX; `_match`), and the largest box
  (input pixels) and score differences of the matched ones.
  """
  missing = sorted(set(want) - set(got))
  if missing:
    raise RuntimeError(f'the artifact does not return {missing}; it returns '
                       f'{sorted(got)}.')
  if what != 'detector':
    return {k: float(np.max(np.abs(got[k] - want[k])) /
                     max(float(np.max(np.abs(want[k]))), 1e-12))
            for k in sorted(want)}
  got = {k: np.asarray(v) for k, v in got.items()}
  want = {k: np.asarray(v) for k, v in want.items()}
  same = np.array_equal(got['num_detections'], want['num_detections'])
  matches = [_match(got, want, i) for i in range(len(want['scores']))]
  return {
      'counts_equal': float(same),
      'unmatched': int(sum(m[0] for m in matches)) if same else -1,
      'max_box_px': max(m[1] for m in matches),
      'max_score': max(m[2] for m in matches),
      'num_detections': int(want['num_detections'].sum()),
  }


def check_parity(request: Any, diffs: dict[str, float]) -> None:
  """Raises unless a float artifact is within the documented tolerances."""
  if request.quantize != 'none':
    return
  if request.what == 'detector':
    ok = diffs['counts_equal'] and diffs['unmatched'] == 0
  else:
    ok = max(diffs.values()) <= RAW_RTOL
  if not ok:
    raise RuntimeError(f'the {request.format} artifact differs from the JAX '
                       f'model beyond tolerance: {diffs}.')


def call_in_batches(runner: Runner, images: np.ndarray, batch: int | None
                    ) -> dict[str, np.ndarray]:
  """`runner` over `images` in its static batch (the last one padded)."""
  if batch is None:
    return runner(images)
  outs = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    outs.append(runner(chunk))
  return {k: np.concatenate([o[k] for o in outs])[:len(images)]
          for k in outs[0]}


# --------------------------------------------------------------- manifest


def sha256_tree(path: str) -> str:
  """sha256 of a file, or of a directory's relative paths and contents."""
  if os.path.isfile(path):
    return export_loader.sha256_file(path)
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode() + b'\0')
      h.update(export_loader.sha256_file(full).encode())
  return h.hexdigest()


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(path) for f in fs)


def versions() -> dict[str, str]:
  out = {}
  for dist in ('jax', 'jaxlib', 'flax', 'tensorflow-cpu', 'tensorflow',
               'ai-edge-litert', 'jax2onnx', 'onnxruntime', 'spinenet_jax'):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def manifest(run: Any, request: Any, file: str, output: str,
             outputs: dict[str, np.ndarray], diffs: dict[str, float],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The JSON written beside every artifact."""
  ec = run.config.eval
  path = os.path.join(output, file)
  return {
      'format': request.format, 'what': request.what,
      'model_id': run.model.model_id, 'task': run.config.task,
      'num_classes': int(run.model.num_classes),
      'step': run.step, 'workdir': run.workdir,
      'input': {'name': 'images', 'shape': list(request.input_shape),
                'dtype': 'uint8', 'layout': 'NHWC, RGB'},
      'preprocessing': {
          'resize': (f'long side to {request.image_size}, keeping the '
                     'aspect ratio (bilinear, no antialiasing)'
                     if run.is_detection else
                     f'central {contract.CENTER_CROP_FRACTION:.1%} square '
                     f'resized to {request.image_size} (bilinear)'),
          # Classifiers crop a square: nothing to pad.
          **({'pad': 'bottom and right, to a square, with pad_rgb',
              'pad_rgb': list(PAD_RGB)} if run.is_detection else
             {'crop_fraction': contract.CENTER_CROP_FRACTION}),
          'normalization': 'in the graph: (x / 255 - mean_rgb) / stddev_rgb',
          'mean_rgb': list(contract.MEAN_RGB),
          'stddev_rgb': list(contract.STDDEV_RGB)},
      'postprocessing': ({
          'boxes': 'ymin, xmin, ymax, xmax in input pixels; divide by the '
                   'resize scale for the original image',
          'score_threshold': request.score_threshold,
          'iou_threshold': ec.iou_threshold,
          'pre_nms_top_k': ec.pre_nms_top_k,
          'max_detections': ec.max_detections}
                         if request.what == 'detector' else None),
      'label_map': {str(k): v for k, v in sorted(run.labels.items())},
      'outputs': {k: {'shape': [None if request.batch is None and i == 0
                                else d for i, d in enumerate(v.shape)],
                      'dtype': str(v.dtype)}
                  for k, v in sorted(outputs.items())},
      'platforms': list(request.platforms), 'quantize': request.quantize,
      'dtype': request.dtype,
      'file': file, 'sha256': sha256_tree(path), 'size_bytes': _size(path),
      'max_difference_to_jax': diffs,
      'versions': versions(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      **(extra or {})}
