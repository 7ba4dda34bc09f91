"""The compiled train step, examined without running it.

`lower_train_step(config)` lowers the real train step (`train_lib.
make_train_step`) on abstract state and batch, so nothing is initialised or
run; `memory(compiled)` reads XLA's per-device memory analysis and
`collectives(compiled)` lists every collective in the partitioned HLO with
the bytes it moves. `audit_data_parallel` checks a data-parallel step
against what it must communicate: the gradient all-reduce (4 bytes x
parameters) plus the batch-norm statistics, and nothing else; nothing in it
may grow with the image size. `compile_with_partitioned_hlo` also returns
the HLO as the SPMD partitioner left it, and `fold_nested` its collectives
with nested all-reduces folded into one, as the GPU compiler folds them.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import jax.numpy as jnp
import ml_collections

from spinenet_jax import models
from spinenet_jax import optim
from spinenet_jax import sharding
from spinenet_jax import train_lib

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute', 'collective-broadcast')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
          'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8,
          'u64': 8}
# `%name = SHAPE op(` or `%name = (SHAPE, SHAPE) op-start(`.
_LINE = re.compile(r'=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\]\S*)\s+'
                   r'(?P<op>' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
_GROUPS = re.compile(r'replica_groups=(\{(?:\{[0-9,]*\},?)*\}|'
                     r'mesh\[[^\]]*\] \{[^}]*\}|'
                     r'\[[^\]]*\][^,]*)')
_COMMENT = re.compile(r'/\*.*?\*/')
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=(.*)$')
_ALL_REDUCE = re.compile(r'\ball-reduce\(([^)]*)\)')
_NAME = re.compile(r'%([\w.\-]+)')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program: per-device output bytes."""
  op: str
  shapes: tuple[str, ...]
  bytes: int
  groups: str

  def __str__(self) -> str:
    return f'{self.op} {self.bytes:,} B {" ".join(self.shapes)} {self.groups}'


def abstract_batch(config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """ShapeDtypeStructs of a global training batch, sharded as train.py
  shards it (on 'data')."""
  b, s = config.batch_size, config.data.image_size
  if config.task == 'retinanet':
    n = config.data.max_instances
    shapes = {'image': ((b, s, s, 3), jnp.float32),
              'boxes': ((b, n, 4), jnp.float32),
              'classes': ((b, n), jnp.int32),
              'is_crowd': ((b, n), jnp.bool_)}
  else:
    shapes = {'image': ((b, s, s, 3), jnp.float32), 'label': ((b,), jnp.int32)}
  on_data = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=on_data)
          for k, (shape, dtype) in shapes.items()}


def lower_train_step(config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh | None = None,
                     state_shardings: Any = None) -> jax.stages.Lowered:
  """The train step of `config` lowered on abstract inputs over `mesh`
  (default: `config.mesh` over all devices). `state_shardings` replaces the
  replicated state shardings (a tree like the state, or a function of the
  abstract state's tree and the mesh)."""
  mesh = mesh or sharding.create_mesh(config.mesh)
  model = models.build_model(config)
  schedule = optim.learning_rate_schedule(config.optimizer,
                                          config.batch_size, 1000)
  tx = optim.create_optimizer(config.optimizer, schedule)
  abstract = jax.eval_shape(lambda: train_lib.init_state(model, tx, config))
  if state_shardings is None:
    shardings = train_lib.replicated_shardings(abstract, mesh)
  elif callable(state_shardings):
    shardings = state_shardings(abstract, mesh)
  else:
    shardings = state_shardings
  with jax.set_mesh(mesh):
    step = train_lib.make_train_step(model, config, tx, schedule, shardings,
                                     mesh)
    return step.lower(train_lib.with_shardings(abstract, shardings),
                      abstract_batch(config, mesh))


def lower_model_gradient(config: ml_collections.ConfigDict, height: int,
                         width: int,
                         mesh: jax.sharding.Mesh | None = None
                         ) -> jax.stages.Lowered:
  """The gradient of the model's forward pass (train-mode batch norm, the
  sum of squares of its outputs) on a [batch_size, height, width, 3] batch
  sharded as the train step shards it (`sharding.partition_images`).

  The train step takes square images only (its anchors and targets are
  built for `data.image_size`); this is the same model's forward and
  backward at any image shape, for what scales with the height or the
  width (the halo exchanges of spatial partitioning)."""
  mesh = mesh or sharding.create_mesh(config.mesh)
  model = models.build_model(config)
  size = config.data.image_size
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  variables = train_lib.with_shardings(
      variables, train_lib.replicated_shardings(variables, mesh))

  def grad(variables, images):
    def loss(params):
      out, _ = model.apply({**variables, 'params': params},
                           sharding.partition_images({'image': images}, mesh
                                                     )['image'],
                           train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(0)})
      return sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                 for x in jax.tree.leaves(out))
    return jax.grad(loss)(variables['params'])

  images = jax.ShapeDtypeStruct((config.batch_size, height, width, 3),
                                jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    return jax.jit(grad).lower(variables, images)


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program: arguments, outputs,
  temporaries, aliased (donated) and their total (arguments + outputs +
  temporaries - aliased)."""
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes,
         'outputs': m.output_size_in_bytes,
         'temporaries': m.temp_size_in_bytes,
         'aliased': m.alias_size_in_bytes}
  out['total'] = (out['arguments'] + out['outputs'] + out['temporaries'] -
                  out['aliased'])
  return out


def _shape_bytes(text: str) -> tuple[tuple[str, ...], int]:
  shapes, total = [], 0
  for dtype, dims in _ARRAY.findall(text):
    if dtype not in _BYTES:
      continue
    size = math.prod(int(d) for d in dims.split(',') if d)
    shapes.append(f'{dtype}[{dims}]')
    total += size * _BYTES[dtype]
  return tuple(shapes), total


def collectives(program: jax.stages.Compiled | str) -> list[Collective]:
  """Every collective in a compiled (partitioned) program's HLO, with its
  per-device output bytes; asynchronous pairs count once (the start)."""
  text = program if isinstance(program, str) else program.as_text()
  found = []
  for line in text.splitlines():
    line = _COMMENT.sub('', line)  # Long tuples carry /*index=5*/ marks.
    match = _LINE.search(line)
    if not match:
      continue
    shapes, size = _shape_bytes(match.group('shape'))
    if match.group('op') == 'collective-permute' and '-start(' in line:
      # Its start's tuple holds the input, the output and two u32 contexts.
      shapes, size = shapes[1:2], _shape_bytes(shapes[1])[1]
    groups = _GROUPS.search(line)
    found.append(Collective(match.group('op'), shapes, size,
                            groups.group(1) if groups else ''))
  return found


def compile_with_partitioned_hlo(lowered: jax.stages.Lowered
                                 ) -> tuple[jax.stages.Compiled, str]:
  """Compiles `lowered`; returns the program and its HLO right after SPMD
  partitioning, before the backend's own passes (from an XLA dump in a
  temporary directory; the compiled program is the same as without it).
  The persistent compilation cache is off for this compile: a cached program
  is not compiled, so nothing would be dumped. JAX decides once per process
  whether to use the cache, so the setting alone is not enough: the cache
  is reset before the compile and again after it, to be decided anew."""
  enabled = jax.config.jax_enable_compilation_cache
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update('jax_enable_compilation_cache', False)
    jax_cache.reset_cache()
    try:
      compiled = lowered.compile(compiler_options={
          'xla_dump_to': tmp, 'xla_dump_hlo_pass_re': 'spmd-partitioning'})
    finally:
      jax.config.update('jax_enable_compilation_cache', enabled)
      jax_cache.reset_cache()
    paths = glob.glob(os.path.join(tmp, '*after_spmd-partitioning*.txt'))
    if not paths:
      if not collectives(compiled):  # One device: nothing was partitioned.
        return compiled, compiled.as_text()
      raise RuntimeError('XLA dumped no module after spmd-partitioning; '
                         'this XLA may name the pass differently.')
    with open(max(paths, key=os.path.getsize)) as f:
      return compiled, f.read()


def fold_nested(text: str) -> list[Collective]:
  """The collectives of a partitioned module (`compile_with_partitioned_hlo`)
  once nested all-reduces are folded, as XLA's `AllReduceFolder` pass
  (run after partitioning by the GPU compiler, not by XLA:CPU) folds
  them: an all-reduce whose one operand is another all-reduce, used by it
  alone, becomes one all-reduce over both groups. Spatial partitioning
  leaves every kernel gradient and batch-norm sum as such a pair, one over
  'data' and one over 'model'."""
  lines = [_COMMENT.sub('', line) for line in text.splitlines()]
  matches = [_DEF.match(line) for line in lines]
  names = [m.group(1) if m else None for m in matches]
  defs = {m.group(1): m.group(2) for m in matches if m}
  uses = {}
  for rhs in defs.values():
    for operand in _NAME.findall(rhs.split(', metadata=')[0]):
      uses[operand] = uses.get(operand, 0) + 1
  folded = set()
  for name, rhs in defs.items():
    match = _ALL_REDUCE.search(rhs)
    operands = _NAME.findall(match.group(1)) if match else []
    if (len(operands) == 1 and uses.get(operands[0]) == 1 and
        _ALL_REDUCE.search(defs.get(operands[0], ''))):
      folded.add(name)
  kept = [line for line, name in zip(lines, names) if name not in folded]
  return collectives('\n'.join(kept))


def promoted(found: list[Collective]) -> list[Collective]:
  """`found` with 16-bit float all-reduces counted at 32 bits, as XLA:CPU
  runs them (its `all-reduce-promotion` pass): the partitioned HLO reduces
  bfloat16 gradients in bfloat16, the compiled CPU program in float32."""
  out = []
  for c in found:
    if c.op == 'all-reduce':
      shapes = tuple(re.sub(r'^(bf16|f16)\[', 'f32[', x) for x in c.shapes)
      c = dataclasses.replace(c, shapes=shapes,
                              bytes=_shape_bytes(' '.join(shapes))[1])
    out.append(c)
  return out


def tree_bytes(tree: Any) -> int:
  """Bytes of the float32 arrays of a tree of arrays or abstract arrays."""
  return sum(4 * math.prod(x.shape) for x in jax.tree.leaves(tree))


def summarize(found: list[Collective]) -> dict[str, tuple[int, int]]:
  """{op: (count, total bytes)}."""
  out: dict[str, tuple[int, int]] = {}
  for c in found:
    n, b = out.get(c.op, (0, 0))
    out[c.op] = (n + 1, b + c.bytes)
  return out


def audit_data_parallel(found: list[Collective], params: Any,
                        batch_stats: Any,
                        slack_bytes: int = 4 * 1024) -> list[str]:
  """Problems of a data-parallel step's collectives (empty: as expected).

  Expected: all-reduces only, of the gradients (4 bytes x parameters) plus
  the batch-norm reductions over the global batch (the forward pass's mean
  and mean of squares, the backward pass's two sums: at most twice the
  bytes of `batch_stats`), plus `slack_bytes` for the loss terms and
  metrics. A weight reduced more than once (the RetinaNet head's convs,
  shared across levels, once per level) or anything else (an all-gather of
  a mis-sharded weight, a collective-permute of a halo) is named.
  """
  problems = [f'unexpected {c}' for c in found if c.op != 'all-reduce']
  total = sum(c.bytes for c in found if c.op == 'all-reduce')
  grads, stats = tree_bytes(params), 2 * tree_bytes(batch_stats)
  if total < grads:
    problems.append(f'all-reduces move {total:,} B, less than the '
                    f'{grads:,} B of gradients: are gradients reduced?')
  if total > grads + stats + slack_bytes:
    problems.append(f'all-reduces move {total:,} B, more than gradients '
                    f'{grads:,} + batch-norm reductions {stats:,} + '
                    f'{slack_bytes:,} B: something else is reduced')
  return problems

