"""ONNX writer of `spinenet_jax.export`, through jax2onnx, run with onnxruntime.

jax2onnx (the converter Keras 3 uses for its JAX backend) pins
`orbax-checkpoint<0.11.37`, which conflicts with the 0.12 this project
installs (and reads its checkpoints with), so it lives in its own
environment: `make onnx` creates `.venv-onnx` (this project, jax2onnx,
onnxruntime). `python -m spinenet_jax.export --format=onnx` in the main
environment restores the run as usual, hands the model's config, weights
and check images to that environment's Python (`.venv-onnx/bin/python`, or
`$SPINENET_ONNX_PYTHON`), which converts, runs onnxruntime on the images and
hands the outputs and the graph's op counts back for the parity check and
the manifest. Where jax2onnx is importable the conversion runs in-process.
ONNX takes the raw outputs, the backbone and the classifier of SpineNet and
SpineNet-Mobile; the detector's NMS does not run in onnxruntime
(`export.check_request`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import Any

from flax import traverse_util
import jax
import numpy as np

from spinenet_jax import export as export_lib
from spinenet_jax import inference

ONNX_PYTHON_ENV = 'SPINENET_ONNX_PYTHON'
DEFAULT_PYTHON = Path(__file__).resolve().parents[1] / '.venv-onnx/bin/python'
MISSING = ('--format=onnx needs jax2onnx and onnxruntime, which live in their '
           'own environment (jax2onnx pins orbax-checkpoint<0.11.37, against '
           f"this project's 0.12) and {{python}} does not exist: run `make "
           f'onnx` once (or point ${ONNX_PYTHON_ENV} at a Python that has '
           'them and this project).')
OPSET = 23


def convert_and_run(fn: export_lib.ServingFn, variables: Any,
                    request: export_lib.Request, path: str, images: np.ndarray
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Writes `path` (weights inlined, named inputs and outputs); returns
  onnxruntime's outputs on `images` and the graph's node count by op."""
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  import onnx_ir  # pylint: disable=g-import-not-at-top
  import onnx_ir.passes.common  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  spec = export_lib.abstract_input(request)  # A symbolic batch: 'b'.
  names = sorted(jax.eval_shape(lambda x: fn(variables, x), spec))

  def outputs(images):  # One trace of `fn`: a call per output would copy it.
    out = fn(variables, images)
    return tuple(out[k] for k in names)

  model = jax2onnx.to_onnx(
      outputs, [spec], model_name='spinenet_jax', opset=OPSET,
      return_mode='ir', input_names=['images'], output_names=names)
  # jax2onnx 0.17 writes a copy of a kernel per call site: the RetinaNet
  # head's shared kernels five times, once per level. Keep one.
  onnx_ir.passes.common.DeduplicateInitializersPass(size_limit=1 << 40)(model)
  model = onnx_ir.to_proto(model)
  # It also moves elementwise ops between NHWC and NCHW after it has
  # annotated their shapes, and leaves the old annotations: onnxruntime then
  # rejects a Mul of two operands annotated in different layouts
  # (SpineNet-Mobile's hard swish after batch norm) and warns about the
  # rest. The annotations are optional; inferred afresh they are right.
  del model.graph.value_info[:]
  onnx.save(onnx.shape_inference.infer_shapes(model), path)
  ops = collections.Counter(node.op_type for node in model.graph.node)
  session = onnxruntime.InferenceSession(
      path, providers=['CPUExecutionProvider'])
  from spinenet_jax import export_report  # pylint: disable=g-import-not-at-top
  return export_report.call_in_batches(
      lambda x: dict(zip(names, session.run(names, {'images': x}))), images,
      request.batch), dict(sorted(ops.items()))


def _importable() -> bool:
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top,unused-import
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def write_onnx(fn: export_lib.ServingFn, variables: Any,
               request: export_lib.Request, output: str,
               run: inference.Run, images: np.ndarray):
  """`model.onnx`, converted here or in the ONNX environment."""
  path = os.path.join(output, 'model.onnx')
  extra = {'onnx_opset': OPSET}
  if _importable():
    got, ops = convert_and_run(fn, variables, request, path, images)
    return 'model.onnx', got, {**extra, 'onnx_ops': ops}
  python = os.environ.get(ONNX_PYTHON_ENV) or str(DEFAULT_PYTHON)
  if not os.path.exists(python):
    raise export_lib.ExportError(MISSING.format(python=python))
  job = os.path.join(output, '.onnx_job')
  os.makedirs(job, exist_ok=True)
  try:
    with open(os.path.join(job, 'config.json'), 'w') as f:
      f.write(run.config.to_json())
    with open(os.path.join(job, 'request.json'), 'w') as f:
      json.dump({**dataclasses.asdict(request), 'step': run.step}, f)
    np.savez(os.path.join(job, 'variables.npz'), **traverse_util.flatten_dict(
        jax.device_get(variables), sep='/'))
    np.save(os.path.join(job, 'images.npy'), images)
    proc = subprocess.run(
        [python, '-m', 'spinenet_jax.export_onnx', job, path],
        capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    if proc.returncode:
      raise RuntimeError(f'ONNX conversion in {python} failed:\n'
                         f'{proc.stderr[-4000:]}')
    got = dict(np.load(os.path.join(job, 'outputs.npz')))
    with open(os.path.join(job, 'ops.json')) as f:
      ops = json.load(f)
  finally:
    shutil.rmtree(job, ignore_errors=True)
  return 'model.onnx', got, {**extra, 'onnx_ops': ops,
                             'converted_by': python}


def _job_main(job: str, path: str) -> None:
  """The ONNX environment's side: rebuild the model, convert, run."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from spinenet_jax import models  # pylint: disable=g-import-not-at-top
  with open(os.path.join(job, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(job, 'request.json')) as f:
    fields = json.load(f)
  step = fields.pop('step')
  fields['platforms'] = tuple(fields['platforms'])
  request = export_lib.Request(**fields)
  variables = traverse_util.unflatten_dict(
      dict(np.load(os.path.join(job, 'variables.npz'))), sep='/')
  run = inference.Run(model=models.build_model(config), variables=variables,
                      config=config, step=step)
  out, ops = convert_and_run(export_lib.serving_function(run, request),
                             variables, request, path,
                             np.load(os.path.join(job, 'images.npy')))
  np.savez(os.path.join(job, 'outputs.npz'), **out)
  with open(os.path.join(job, 'ops.json'), 'w') as f:
    json.dump(ops, f)


if __name__ == '__main__':
  _job_main(sys.argv[1], sys.argv[2])
