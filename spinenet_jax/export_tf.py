"""TF SavedModel and TFLite (LiteRT) writers of `spinenet_jax.export`.

Both go through `jax2tf.convert` (native serialization: the whole graph is
one `XlaCallModule` op carrying StableHLO), as the jax2tf and LiteRT docs
describe. The weights become `tf.Variable`s of the SavedModel; the TFLite
converter folds them (and batch norm) into the kernels.

StableHLO version: jax writes StableHLO at a version about 4 weeks older
than its own, which can still be newer than the installed TensorFlow reads
(jax 0.10.2 writes 1.15.0, where `lax.top_k` is a `vhlo.composite_v2`; TF
2.21 reads up to 1.13.7 and fails with "failed to deserialize portable
artifact"). `consumer_stablehlo()` serializes at the older of the two
versions instead, which StableHLO's compatibility guarantees support; so
the whole detector, NMS included, converts and runs on the TF that this
project installs.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from spinenet_jax import export as export_lib
from spinenet_jax import export_report
from spinenet_jax import inference

REPRESENTATIVE_IMAGES = 32


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in str(text).split('.'))


def consumer_version() -> str:
  """The newest StableHLO version the installed TensorFlow deserializes."""
  from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=g-import-not-at-top
  return stablehlo.get_current_version()


@contextlib.contextmanager
def consumer_stablehlo() -> Iterator[str]:
  """Serializes jax.export StableHLO at a version the installed TF reads.

  Yields the target version. jax has no public option for the target, so
  this replaces its private `_module_to_bytecode` for the duration; if that
  is gone (a newer jax), it warns and leaves jax's own target.
  """
  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge
  from jax._src.export import _export
  from jax._src.lib import _jax
  from jax._src.lib.mlir.dialects import hlo
  # pylint: enable=g-import-not-at-top
  own = hlo.get_version_from_compatibility_requirement(
      hlo.StablehloCompatibilityRequirement.WEEK_4)
  target = min(own, consumer_version(), key=_version)
  original = getattr(_export, '_module_to_bytecode', None)
  if original is None or target == own:
    yield own
    return

  def to_bytecode(module):
    return _jax.mlir.serialize_portable_artifact(
        module, target, xla_bridge.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = to_bytecode  # pylint: disable=protected-access
  try:
    yield target
  finally:
    _export._module_to_bytecode = original  # pylint: disable=protected-access


def tf_module(fn: export_lib.ServingFn, variables: Any,
              request: export_lib.Request,
              inline_weights: bool = False) -> tf.Module:
  """A `tf.Module` whose `serve(images)` runs `fn` with the weights as
  (non-trainable) `tf.Variable`s, or as constants of the StableHLO
  (`inline_weights`, which the TFLite converter needs to fold them into
  the kernels: with variables it stops at the kernels' transposes)."""
  size = request.image_size
  leaves, treedef = jax.tree.flatten(variables)
  shape = f'(b, {size}, {size}, 3)'
  if inline_weights:
    converted = jax2tf.convert(
        lambda images: fn(variables, images), with_gradient=False,
        polymorphic_shapes=None if request.batch is not None else [shape],
        native_serialization_platforms=request.platforms)
  else:
    converted = jax2tf.convert(
        lambda weights, images: fn(jax.tree.unflatten(treedef, weights),
                                   images),
        with_gradient=False,
        polymorphic_shapes=(None if request.batch is not None
                            else [None, shape]),
        native_serialization_platforms=request.platforms)
  module = tf.Module()
  module.weights = [] if inline_weights else [
      tf.Variable(np.asarray(a), trainable=False) for a in leaves]

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec(request.input_shape, tf.uint8, name='images')])
  def serve(images):
    if inline_weights:
      return converted(images)
    return converted(list(module.weights), images)

  module.serve = serve
  return module


def _jpeg_signature(module: tf.Module, request: export_lib.Request):
  """`serving_jpeg(jpegs)`: encoded images of any size -> detections in
  each image's own pixels (resize long side, pad with the mean colour)."""
  size = request.image_size
  pad = tf.constant(export_report.PAD_RGB, tf.float32)

  def fit(jpeg):
    image = tf.cast(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.reduce_min(size / hw)
    new_hw = tf.clip_by_value(tf.round(hw * scale), 1, size)
    image = tf.image.resize(image, tf.cast(new_hw, tf.int32), 'bilinear')
    canvas = tf.image.pad_to_bounding_box(image - pad, 0, 0, size, size) + pad
    return tf.cast(tf.clip_by_value(tf.round(canvas), 0, 255), tf.uint8), scale

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([request.batch], tf.string, name='jpegs')])
  def serve_jpeg(jpegs):
    images, scales = tf.map_fn(
        fit, jpegs, fn_output_signature=(
            tf.TensorSpec([size, size, 3], tf.uint8), tf.float32))
    out = dict(module.serve(images))
    out['boxes'] = out['boxes'] / scales[:, None, None]
    out['scales'] = scales
    return out

  return serve_jpeg


def _tf_runner(fn) -> export_report.Runner:
  return lambda images: {k: v.numpy() for k, v in fn(
      images=tf.constant(images)).items()}


def write_savedmodel(fn: export_lib.ServingFn, variables: Any,
                     request: export_lib.Request, output: str,
                     run: inference.Run, images: np.ndarray):
  """`saved_model/` with `serving_default` (uint8 images) and, for the
  detector, `serving_jpeg` (encoded JPEG bytes)."""
  del run
  path = os.path.join(output, 'saved_model')
  with consumer_stablehlo() as target:
    module = tf_module(fn, variables, request)
    signatures = {'serving_default': module.serve.get_concrete_function()}
    if request.what == 'detector':
      module.serve_jpeg = _jpeg_signature(module, request)
      signatures['serving_jpeg'] = module.serve_jpeg.get_concrete_function()
    tf.saved_model.save(module, path, signatures=signatures)
  loaded = tf.saved_model.load(path)
  got = export_report.call_in_batches(
      _tf_runner(loaded.signatures['serving_default']), images, request.batch)
  return 'saved_model', got, {
      'stablehlo_version': target, 'signatures': sorted(signatures)}


def representative_images(run: inference.Run, request: export_lib.Request,
                          n: int = REPRESENTATIVE_IMAGES) -> np.ndarray:
  """Calibration inputs for int8: shapes *training* images (the check uses
  validation images), fitted to the input."""
  from input_pipeline import shapes  # pylint: disable=g-import-not-at-top
  from spinenet_jax import export_loader  # pylint: disable=g-import-not-at-top
  cfg = shapes.make_config('detection' if run.is_detection
                           else 'classification')
  return np.stack([export_loader.fit_image(
      shapes.render(cfg, 'train', i)['image'], request.image_size,
      export_report.PAD_RGB)[0] for i in range(n)])


def tflite_ops(model: bytes) -> dict[str, int]:
  """Op name -> count in a TFLite flatbuffer."""
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
  interp = interpreter.Interpreter(model_content=model)
  return dict(collections.Counter(
      op['op_name'] for op in interp._get_ops_details()))  # pylint: disable=protected-access


def write_tflite(fn: export_lib.ServingFn, variables: Any,
                 request: export_lib.Request, output: str,
                 run: inference.Run, images: np.ndarray):
  """`model.tflite`: builtin ops only (no Flex, no custom ops)."""
  with consumer_stablehlo() as target:
    module = tf_module(fn, variables, request, inline_weights=True)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if request.quantize != 'none':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if request.quantize == 'int8':
      calibration = representative_images(run, request)
      batch = request.batch or 1
      converter.representative_dataset = lambda: (
          [calibration[i:i + batch]]
          for i in range(0, len(calibration) - batch + 1, batch))
      converter.target_spec.supported_ops = [
          tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    model = converter.convert()
  ops = tflite_ops(model)
  foreign = sorted(o for o in ops if o.startswith('Flex') or o in (
      'CUSTOM', 'DELEGATE'))
  if foreign:
    raise RuntimeError(f'the TFLite model needs non-builtin ops {foreign}; '
                       'builtins only is the contract of --format=tflite.')
  path = os.path.join(output, 'model.tflite')
  with open(path, 'wb') as f:
    f.write(model)
  runner, kernels = tflite_runner(path)
  got = export_report.call_in_batches(runner, images, request.batch)
  return 'model.tflite', got, {
      'stablehlo_version': target, 'tflite_ops': ops,
      'tflite_kernels': kernels}


def tflite_runner(path: str) -> tuple[export_report.Runner, str]:
  """Runs `serving_default` of a .tflite file with ai-edge-litert, and says
  with which kernels: XNNPACK (LiteRT's default on CPU) or, when XNNPACK
  cannot prepare the graph (seen with some full-integer models), the
  builtin kernels."""
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
  kinds = interpreter.OpResolverType
  errors = []
  for kind, name in ((kinds.AUTO, 'xnnpack'),
                     (kinds.BUILTIN_WITHOUT_DEFAULT_DELEGATES, 'builtin')):
    runner = interpreter.Interpreter(
        model_path=path, experimental_op_resolver_type=kind
    ).get_signature_runner('serving_default')
    try:
      runner(images=np.zeros(runner.get_input_details()['images']['shape'],
                             np.uint8))
    except RuntimeError as e:
      errors.append(f'{name}: {str(e).splitlines()[0]}')
      continue
    note = name if not errors else f'{name} ({"; ".join(errors)})'
    return (lambda images: {k: np.asarray(v)
                            for k, v in runner(images=images).items()}), note
  raise RuntimeError(f'ai-edge-litert cannot run {path}: {errors}')
