"""Model summary: trainable parameters, multiply-adds and output shapes.

  python -m spinenet_jax.summary --model=49 --task=retinanet --image_size=640

MACs are counted from the model itself: the forward pass is traced to a jaxpr
(no compilation) and every convolution and matmul in it contributes
output elements x contraction size. Elementwise work (batch norm,
activations, pooling) is not counted, as in the paper's FLOPs. The
convolutions are traced as XLA's (`conv_impl='xla'`), whatever lowering the
model runs: the count is the model's, not that of a lowering's algorithm
(Winograd's matmuls do a quarter of a 3x3 convolution's multiply-adds).

With --memory the COCO recipe's train step is also compiled (not run) for a
per-device batch, compute dtype, rematerialisation and mesh, and its
per-device memory and collectives are printed (`step_audit.py`):

  python -m spinenet_jax.summary --model=143 --image_size=1280 --memory \
      --dtype=bfloat16 --batch=2 --remat=blocks --num_devices=8 --mesh_model=2
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from spinenet_jax import models
from spinenet_jax import remat
from spinenet_jax import step_audit


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, 'jaxpr') and hasattr(v, 'consts'):  # ClosedJaxpr
        yield v.jaxpr
      elif hasattr(v, 'eqns'):  # Jaxpr
        yield v


def count_macs(jaxpr: Any) -> int:
  """Multiply-adds of all convolutions and dot products in a jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += (math.prod(eqn.outvars[0].aval.shape) *
                math.prod(lhs[d] for d in lhs_contract))
    for sub in _sub_jaxprs(eqn.params):
      total += count_macs(sub)
  return total


def summarize(model: nn.Module, image_size: int | tuple[int, int],
              batch_size: int = 1) -> dict[str, Any]:
  """Returns {'params', 'macs' (per image), 'outputs'} without running it."""
  if 'conv_impl' in {f.name for f in dataclasses.fields(model)}:
    model = model.clone(conv_impl='xla')
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  images = jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                       variables, images)
  shapes = jax.tree.map(lambda a: list(a.shape), out)
  return {'params': params, 'macs': count_macs(closed.jaxpr) // batch_size,
          'outputs': _jsonable(shapes)}


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  return tree


FLAGS = flags.FLAGS
flags.DEFINE_string('model', '49', 'SpineNet model id.')
flags.DEFINE_enum('task', 'retinanet', ['retinanet', 'classification'], 'Model.')
flags.DEFINE_integer('image_size', 640, 'Square input size.')
flags.DEFINE_integer('num_classes', None, 'Classes (default 91 / 1001).')
flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
flags.DEFINE_bool('json', False, 'Print one JSON object.')
flags.DEFINE_bool('memory', False, 'Compile the train step (not run) and '
                  'print its per-device memory and collectives.')
flags.DEFINE_integer('batch', 1, 'Per-device batch (--memory).')
flags.DEFINE_enum('remat', 'none', list(remat.MODES),
                  'Rematerialisation (--memory).')
flags.DEFINE_integer('mesh_model', 1, "Devices on the mesh's 'model' axis: "
                     'spatial partitioning (--memory).')
flags.DEFINE_integer('num_devices', None, 'Simulated CPU devices '
                     '(--memory; default: the devices there are).')


def memory_report(model_id: str, image_size: int, per_device_batch: int,
                  dtype: str = 'bfloat16', remat: str = 'none',
                  mesh_model: int = 1, conv_impl: str = 'auto'
                  ) -> dict[str, Any]:
  """Per-device memory (bytes) and collectives of the COCO recipe's
  compiled train step over all devices, `mesh_model` of them on 'model':
  as XLA:CPU compiles them and with nested all-reduces folded
  (`step_audit.fold_nested`, what the GPU compiler does; bfloat16 counted
  as float32, as XLA:CPU reduces it)."""
  config = common.coco_recipe(model_id, image_size)
  config.dtype = dtype
  config.model.remat = remat
  config.model.conv_impl = conv_impl
  config.mesh.model = mesh_model
  config.batch_size = per_device_batch * jax.device_count() // mesh_model
  compiled, partitioned = step_audit.compile_with_partitioned_hlo(
      step_audit.lower_train_step(config))
  return {'memory': step_audit.memory(compiled),
          'collectives': step_audit.summarize(
              step_audit.collectives(compiled)),
          'collectives_folded': step_audit.summarize(step_audit.promoted(
              step_audit.fold_nested(partitioned)))}


def _print_memory() -> None:
  report = memory_report(FLAGS.model, FLAGS.image_size, FLAGS.batch,
                         FLAGS.dtype, FLAGS.remat, FLAGS.mesh_model)
  if FLAGS.json:
    print(json.dumps(report))
    return
  print(f'train step, {jax.device_count()} devices (model axis '
        f'{FLAGS.mesh_model}), per-device batch {FLAGS.batch}, '
        f'{FLAGS.dtype}, remat {FLAGS.remat}; per device:')
  for key, value in report['memory'].items():
    print(f'  {key:12s} {value / 2**30:8.3f} GiB')
  for op, (count, size) in sorted(report['collectives'].items()):
    print(f'  {op}: {count} ops, {size:,} B')
  count, size = report['collectives_folded'].get('all-reduce', (0, 0))
  print(f'  all-reduce with nested pairs folded: {count} ops, {size:,} B')


def main(argv: Sequence[str]) -> None:
  """Prints the summary of --model; `argv` is unused (absl.app)."""
  del argv
  if FLAGS.memory:
    if FLAGS.num_devices:
      jax.config.update('jax_num_cpu_devices', FLAGS.num_devices)
    _print_memory()
    return
  kwargs = {'model_id': FLAGS.model, 'dtype': models.get_dtype(FLAGS.dtype)}
  if FLAGS.num_classes is not None:
    kwargs['num_classes'] = FLAGS.num_classes
  model = models.TASKS[FLAGS.task](**kwargs)
  s = summarize(model, FLAGS.image_size)
  if FLAGS.json:
    print(json.dumps(s))
    return
  print(f'SpineNet-{FLAGS.model} {FLAGS.task} at {FLAGS.image_size}x'
        f'{FLAGS.image_size}, {model.num_classes} classes')
  print(f'  trainable parameters: {s["params"]:,} ({s["params"] / 1e6:.2f}M)')
  print(f'  multiply-adds:        {s["macs"]:,} ({s["macs"] / 1e9:.1f}B)')
  outputs = s['outputs']
  for key, value in (outputs.items() if isinstance(outputs, dict)
                     else [('logits', outputs)]):
    if isinstance(value, dict):
      for level, shape in value.items():
        print(f'  {key} level {level}: {shape}')
    else:
      print(f'  {key}: {value}')


if __name__ == '__main__':
  app.run(main)
