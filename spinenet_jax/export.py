"""Exports a trained run for serving, and checks the artifact against JAX.

```sh
python -m spinenet_jax.export --workdir=runs/demo --format=jax --output=exported/
python -m spinenet_jax.export --workdir=runs/demo --format=savedmodel --output=sm/
python -m spinenet_jax.export --workdir=RUN --format=tflite --what=raw \
    --quantize=int8 --output=tfl/
```

Formats (`--format`):
- `jax`: `jax.export` StableHLO (the canonical artifact), lowered for CPU
  and CUDA by default (`--platforms`), with `loader.py` beside it that needs
  only jax and numpy (`spinenet_jax/export_loader.py`).
- `savedmodel`: a TF SavedModel (jax2tf, one `XlaCallModule` op) with a
  `serving_default` signature on uint8 images (`export_tf.py`).
- `tflite`: LiteRT flatbuffer, TFLite builtin ops only, optionally
  quantized (`export_tf.py`).
- `onnx`: ONNX through jax2onnx, run in the separate `make onnx`
  environment (`export_onnx.py`); every graph but the detector.

What (`--what`): `detector` (normalisation, backbone, head, box decode and
NMS: images in, boxes / scores / classes / num_detections out), `raw` (the
head's per-level outputs), `backbone` (the feature maps) or `classifier`
(logits and probabilities). Every artifact takes uint8 RGB `[B, S, S, 3]`
(`--batch=N`, or `dynamic`); the preprocessing contract is in its
`manifest.json`, with the label map, output names, versions, sha256 and the
measured difference to the JAX model on the built-in shapes images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from spinenet_jax import cli
from spinenet_jax import export_loader
from spinenet_jax import export_report
from spinenet_jax import inference
from spinenet_jax import models
from spinenet_jax.detection import postprocess

FORMATS = ('jax', 'savedmodel', 'tflite', 'onnx')
WHATS = ('detector', 'raw', 'backbone', 'classifier')
QUANTIZE = ('none', 'dynamic', 'int8')
DEFAULT_PLATFORMS = ('cpu', 'cuda')

ServingFn = Callable[[Any, jax.Array], dict[str, jax.Array]]


class ExportError(ValueError):
  """A request the chosen run or format cannot take; says what works."""


@dataclasses.dataclass(frozen=True)
class Request:
  """What to export: a checked combination of format, graph and shapes."""
  format: str
  what: str
  batch: int | None  # None: any batch size.
  image_size: int
  quantize: str = 'none'
  platforms: tuple[str, ...] = DEFAULT_PLATFORMS
  dtype: str = 'float32'
  score_threshold: float | None = None  # The detector's; None otherwise.

  @property
  def input_shape(self) -> tuple[int | None, int, int, int]:
    return (self.batch, self.image_size, self.image_size, 3)


def check_request(run: inference.Run, fmt: str, what: str | None = None,
                  batch: int | str | None = 1, image_size: int | None = None,
                  quantize: str = 'none',
                  platforms: Sequence[str] | None = None,
                  dtype: str = 'float32',
                  score_threshold: float | None = None) -> Request:
  """The `Request`, or an `ExportError` that names the bad value and a fix."""
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r} is not one of {FORMATS}.')
  default = 'detector' if run.is_detection else 'classifier'
  what = what or default
  if what not in WHATS:
    raise ExportError(f'--what={what!r} is not one of {WHATS}.')
  if run.is_detection and what == 'classifier':
    raise ExportError('--what=classifier needs a classification run; this '
                      'is a detection run: use --what=detector, raw or '
                      'backbone.')
  if not run.is_detection and what in ('detector', 'raw'):
    raise ExportError(f'--what={what} needs a detection run; this is a '
                      'classification run: use --what=classifier or backbone.')
  if fmt == 'onnx' and what == 'detector':
    raise ExportError(
        '--format=onnx cannot take --what=detector: the NMS (a while loop '
        'with boolean selects and scatters) does not run in onnxruntime. '
        'Export --what=raw to ONNX and decode and NMS its outputs in your '
        'runtime, or use --format=jax or savedmodel for the whole detector.')
  if quantize not in QUANTIZE:
    raise ExportError(f'--quantize={quantize!r} is not one of {QUANTIZE}.')
  if quantize != 'none' and fmt != 'tflite':
    raise ExportError(f'--quantize={quantize} is for --format=tflite only; '
                      f'{fmt} artifacts are float: drop --quantize.')
  if quantize == 'int8' and what == 'detector':
    raise ExportError('--quantize=int8 cannot take --what=detector: integer '
                      'NMS and box decoding lose the boxes. Quantize '
                      '--what=raw (or backbone) and decode in float, or use '
                      '--quantize=dynamic for the detector.')
  if batch in ('dynamic', None):
    batch = None
  else:
    try:
      batch = int(batch)
    except (TypeError, ValueError):
      raise ExportError(f'--batch={batch!r} is neither a positive integer '
                        "nor 'dynamic'.") from None
    if batch < 1:
      raise ExportError(f'--batch={batch} must be >= 1 (or dynamic).')
  size = run.image_size if image_size is None else int(image_size)
  stride = 2 ** run.model.max_level
  if size < stride or size % stride:
    fix = max(stride, round(size / stride) * stride)
    raise ExportError(
        f'--image_size={size} is not a multiple of {stride} (2^max_level, '
        f'the coarsest feature map\'s stride); use e.g. {fix}.')
  platforms = tuple(platforms or DEFAULT_PLATFORMS)
  if fmt in ('tflite', 'onnx'):
    platforms = ('cpu',)
  bad = sorted(set(platforms) - {'cpu', 'cuda', 'rocm', 'tpu'})
  if bad:
    raise ExportError(f'--platforms has unknown {bad}; use cpu, cuda, rocm '
                      'or tpu.')
  if dtype not in ('float32', 'bfloat16'):
    raise ExportError(f'--dtype={dtype!r} is not float32 or bfloat16.')
  if dtype != 'float32' and fmt in ('tflite', 'onnx'):
    raise ExportError(f'--format={fmt} takes float32 graphs only (use '
                      '--quantize for smaller TFLite models); drop --dtype.')
  if score_threshold is not None and what != 'detector':
    raise ExportError('--score_threshold is for --what=detector only.')
  if what == 'detector' and score_threshold is None:
    score_threshold = run.config.eval.score_threshold
  return Request(fmt, what, batch, size, quantize, platforms, dtype,
                 score_threshold)


# ------------------------------------------------------------ the graphs


def _backbone_variables(variables: dict[str, Any]) -> dict[str, Any]:
  return {'params': variables['params']['backbone'],
          'batch_stats': variables.get('batch_stats', {}).get('backbone', {})}


def export_model(run: inference.Run, request: Request):
  """The run's model in the request's dtype (float32 by default, whatever
  the training dtype). Its convolutions are XLA's (which the TFLite
  converter maps to its own conv ops, jax2onnx to ONNX Conv, and which
  suit GPUs and TPUs) except in CPU-only jax artifacts, where the CPU
  lowerings (im2col and Winograd matmuls) are faster."""
  keep = request.format == 'jax' and request.platforms == ('cpu',)
  return run.model.clone(dtype=models.get_dtype(request.dtype),
                         conv_impl=run.model.conv_impl if keep else 'xla')


def serving_function(run: inference.Run, request: Request) -> ServingFn:
  """`fn(variables, uint8 images) -> {name: array}` for `request.what`."""
  model = export_model(run, request)
  what, size = request.what, request.image_size
  if what == 'backbone':
    backbone = model.backbone()

    def fn(variables, images):
      feats = backbone.apply(_backbone_variables(variables),
                             inference.normalize(images), train=False)
      return {f'features_l{l}': v for l, v in sorted(feats.items())}
  elif what == 'classifier':
    def fn(variables, images):
      logits = model.apply(variables, inference.normalize(images), train=False)
      return {'logits': logits, 'probabilities': jax.nn.softmax(logits)}
  elif what == 'raw':
    def fn(variables, images):
      out = model.apply(variables, inference.normalize(images), train=False)
      return {f'{k}_l{l}': v for k in ('cls_outputs', 'box_outputs')
              for l, v in sorted(out[k].items())}
  else:
    ec = run.config.eval
    anchors = model.anchors(size)

    def fn(variables, images):
      out = model.apply(variables, inference.normalize(images), train=False)
      # vmap, not the CPU loop: it takes a symbolic batch and suits GPUs.
      return postprocess.detect(
          out['cls_outputs'], out['box_outputs'], anchors, (size, size),
          pre_nms_top_k=ec.pre_nms_top_k,
          score_threshold=request.score_threshold,
          iou_threshold=ec.iou_threshold, max_detections=ec.max_detections,
          vectorize=True)
  return fn


# ------------------------------------------------------- jax.export writer


def abstract_input(request: Request) -> jax.ShapeDtypeStruct:
  batch = request.batch
  if batch is None:
    batch, = jax.export.symbolic_shape('b')
  return jax.ShapeDtypeStruct((batch, *request.input_shape[1:]), jnp.uint8)


def write_jax(fn: ServingFn, variables: Any, request: Request, output: str,
              run: inference.Run, images: np.ndarray
              ) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
  """`model.jax_export` (weights inlined) and `loader.py`; returns the file,
  the outputs on `images` of the deserialized written file, and no extra
  manifest fields. (Every writer has this signature.)"""
  del run  # The graph is all it needs.
  exported = jax.export.export(
      jax.jit(lambda images: fn(variables, images)),
      platforms=request.platforms)(abstract_input(request))
  path = os.path.join(output, 'model.jax_export')
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  shutil.copyfile(export_loader.__file__, os.path.join(output, 'loader.py'))
  with open(path, 'rb') as f:
    loaded = jax.export.deserialize(bytearray(f.read()))
  got = export_report.call_in_batches(
      lambda x: jax.tree.map(np.asarray, loaded.call(x)), images,
      request.batch)
  return 'model.jax_export', got, {}


# -------------------------------------------------------------------- API


def _writer(fmt: str):
  if fmt == 'jax':
    return write_jax
  if fmt == 'onnx':
    from spinenet_jax import export_onnx  # pylint: disable=g-import-not-at-top
    return export_onnx.write_onnx
  from spinenet_jax import export_tf  # pylint: disable=g-import-not-at-top
  return export_tf.write_savedmodel if fmt == 'savedmodel' else (
      export_tf.write_tflite)


def export_run(run: inference.Run, fmt: str, output: str,
               what: str | None = None, batch: int | str | None = 1,
               image_size: int | None = None, quantize: str = 'none',
               platforms: Sequence[str] | None = None,
               dtype: str = 'float32', score_threshold: float | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes `run` as `fmt` into `output`, checks it, returns the manifest.

  The artifact is run on `export_report.NUM_CHECK_IMAGES` shapes images and
  compared with the JAX model; a float artifact beyond tolerance raises (a
  quantized one only records its difference).
  """
  request = check_request(run, fmt, what, batch, image_size, quantize,
                          platforms, dtype, score_threshold)
  fn = serving_function(run, request)
  variables = jax.device_get(run.variables)
  images = export_report.check_images(run, request)
  want = jax.tree.map(np.asarray, jax.jit(fn)(variables, images))
  os.makedirs(output, exist_ok=True)
  log(f'Exporting {request.what} of {run.workdir or "the run"} (step '
      f'{run.step}) as {fmt} {request.input_shape} ...')
  file, got, extra = _writer(fmt)(fn, variables, request, output, run,
                                  images)
  diffs = export_report.compare(request.what, got, want)
  export_report.check_parity(request, diffs)
  info = export_report.manifest(run, request, file, output, want, diffs,
                                extra)
  with open(os.path.join(output, export_loader.MANIFEST), 'w') as f:
    json.dump(info, f, indent=2)
    f.write('\n')
  log(f'Wrote {os.path.join(output, file)} ({info["size_bytes"]:,} bytes, '
      f'sha256 {info["sha256"][:12]}...); difference to JAX on '
      f'{len(images)} images: {diffs}')
  return info


def export(workdir: str, fmt: str, output: str, step: int | None = None,
           **kwargs: Any) -> dict[str, Any]:
  """`export_run` of `load_checkpoint(workdir, step)`."""
  return export_run(inference.load_checkpoint(workdir, step), fmt, output,
                    **kwargs)


# -------------------------------------------------------------------- CLI


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training run directory.',
                      flag_values=fv, required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).',
                       flag_values=fv)
  flags.DEFINE_enum('format', 'jax', FORMATS, 'Artifact format.',
                    flag_values=fv)
  flags.DEFINE_string('output', None, 'Output directory.', flag_values=fv,
                      required=True)
  flags.DEFINE_string('what', None, f'One of {WHATS} (default: detector or '
                      'classifier, by the run).', flag_values=fv)
  flags.DEFINE_string('batch', '1', "Batch size, or 'dynamic'.",
                      flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'Input size (default: the '
                       "run's config.data.image_size).", flag_values=fv)
  flags.DEFINE_enum('quantize', 'none', QUANTIZE, 'TFLite quantization.',
                    flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute '
                    'dtype of the graph (jax and savedmodel may take '
                    'bfloat16).', flag_values=fv)
  flags.DEFINE_float('score_threshold', None, 'Detector: keep detections '
                     "scoring above this (default: the run's "
                     'config.eval.score_threshold).', flag_values=fv)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'Lowering '
                    'platforms of jax and savedmodel artifacts.',
                    flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  fv = cli.parse_flags('spinenet_jax.export', __doc__, _define_flags, argv)
  if isinstance(fv, int):
    return fv
  try:
    run = inference.load_checkpoint(fv.workdir, fv.step)
    export_run(run, fv.format, fv.output, what=fv.what, batch=fv.batch,
               image_size=fv.image_size, quantize=fv.quantize,
               platforms=fv.platforms, dtype=fv.dtype,
               score_threshold=fv.score_threshold)
  except (ExportError, FileNotFoundError) as e:
    print(f'export: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
