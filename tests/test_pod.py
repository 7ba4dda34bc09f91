"""Pod-scale training on 8 CPU devices: rematerialisation, spatial
partitioning over the 'model' axis, the collective audit of the compiled
step, multi-slice meshes and their config checks.

Programs are compiled, not run, wherever the figure is a property of the
compiled step (memory, collectives); the equality tests run one tiny step.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spinenet_jax import config_checks
from spinenet_jax import models
from spinenet_jax import optim
from spinenet_jax import remat
from spinenet_jax import sharding
from spinenet_jax import sharding_utils
from spinenet_jax import step_audit
from spinenet_jax import train_lib
from tests.tiny import load_config
from tests.tiny import TINY_DEMO

# Levels 3..5 only, so that 128-pixel images split 4 ways down to level 5
# (spatial partitioning needs the height divisible by k * 2^max_level).
LOW_SPECS = ((3, 'bottleneck', (0, 1), True), (4, 'residual', (0, 2), True),
             (5, 'bottleneck', (2, 3), True), (4, 'bottleneck', (3, 4), False))
LOW_MOBILE = tuple((l, 'mbconv', i, o) for l, _, i, o in LOW_SPECS)
LOW = {**TINY_DEMO, 'model.block_specs': LOW_SPECS,
       'optimizer.ema_decay': 0.0}


def _config(overrides=None, **mesh):
  config = load_config('demo', {**LOW, **(overrides or {})})
  with config.unlocked():
    config.model.max_level = 5  # Not in the demo config: the default is 7.
    config.mesh.update(mesh)
  return config


def _batch(config, seed=0):
  b, s, n = config.batch_size, config.data.image_size, 8
  rng = np.random.default_rng(seed)
  yx = rng.uniform(0, s * 0.6, (b, n, 2))
  hw = rng.uniform(s * 0.1, s * 0.4, (b, n, 2))
  boxes = np.zeros((b, config.data.max_instances, 4), np.float32)
  boxes[:, :n] = np.concatenate([yx, np.minimum(yx + hw, s)], -1)
  classes = np.full((b, config.data.max_instances), -1, np.int32)
  classes[:, :n] = rng.integers(1, config.model.num_classes, (b, n))
  return {'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
          'boxes': boxes, 'classes': classes,
          'is_crowd': np.zeros(classes.shape, bool)}


def _step(config, mesh, initial, batch):
  """One train step from the host state `initial` on `mesh`."""
  model = models.build_model(config)
  schedule = optim.learning_rate_schedule(config.optimizer,
                                          config.batch_size, 12)
  tx = optim.create_optimizer(config.optimizer, schedule)
  with jax.set_mesh(mesh):
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), initial)
    step = train_lib.make_train_step(model, config, tx, schedule, shardings,
                                     mesh)
    state, metrics = step(jax.device_put(initial, shardings),
                          sharding.global_batch(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _initial(config):
  model = models.build_model(config)
  tx = optim.create_optimizer(config.optimizer, lambda s: 0.1)
  mesh = sharding.create_mesh(config.mesh)
  with jax.set_mesh(mesh):
    return jax.device_get(train_lib.create_state(model, tx, config, mesh)[0])


def _assert_bitwise(got, want):
  """Every leaf of the tree `got` equals `want`'s, bit for bit."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                          jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ remat


def _loss_and_grads(mode: str, overrides=None):
  """(loss, grads, temporary bytes) of a train-mode forward and backward
  pass of the tiny model with remat `mode`."""
  config = _config({'model.remat': mode, **(overrides or {})})
  if 'mobile' in config.model.model_id:
    with config.unlocked():
      config.model.stem_filters = None  # Mobile stems have no such field.
  model = models.build_model(config)
  batch = _batch(config)
  variables = jax.jit(lambda: model.init(jax.random.key(0), batch['image'][:1]))()

  def loss_and_grads(params):
    def loss(p):
      out, _ = model.apply({**variables, 'params': p}, batch['image'],
                           train=True, mutable=['batch_stats'])
      return sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(out))
    return jax.value_and_grad(loss)(params)
  options = train_lib.compiler_options('cpu')  # As train steps do.
  compiled = jax.jit(loss_and_grads, compiler_options=options).lower(
      variables['params']).compile()
  loss, grads = jax.device_get(compiled(variables['params']))
  return loss, grads, step_audit.memory(compiled)['temporaries']


@pytest.mark.parametrize('overrides,saves_memory', [
    ({}, True),
    ({'model.model_id': '49_mobile', 'model.block_specs': LOW_MOBILE}, False)
], ids=['spinenet', 'mobile'])
def test_remat_gives_the_same_loss_and_gradients_in_less_memory(
    overrides, saves_memory):
  """'full' (which remats every block too): bitwise the same loss and
  gradients. A feature read by several consumers sums their gradients in
  one fixed order (`remat.fan_out`); left to JAX, the order followed the
  remat grouping and the stem's gradients differed by 1e-6 relative.
  SpineNet-Mobile's blocks also need `remat.gradient_barrier` (one batch-
  norm bias gradient was reduced in another order). Fewer temporaries even
  on this tiny network for SpineNet; tiny Mobile's 8-channel blocks save
  less than its copies cost (Mobile-49 at 384 px, batch 2, one device: 609
  -> 323 MiB; full size: pod_memory.py)."""
  loss, grads, temps = _loss_and_grads('none', overrides)
  loss_r, grads_r, temps_r = _loss_and_grads('full', overrides)
  assert float(loss_r) == float(loss)
  _assert_bitwise(grads_r, grads)
  if saves_memory:
    assert temps_r < temps, (temps_r, temps)


def _one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'model'))


def test_remat_lowers_the_step_temporaries_on_one_cpu_device():
  """On one device too (train steps on CPU are scheduled for memory; under
  XLA:CPU's default scheduler the recomputation ran as early as it could
  and remat saved little: tiny 0.83x, 49@640 0.96x). Also: the
  partitioned-HLO audit of a one-device program, where no partitioning
  pass runs."""
  temps = {}
  for mode in ('none', 'full'):
    compiled, text = step_audit.compile_with_partitioned_hlo(
        step_audit.lower_train_step(_config({'model.remat': mode}),
                                    _one_device_mesh()))
    temps[mode] = step_audit.memory(compiled)['temporaries']
    assert not step_audit.fold_nested(text)
  assert temps['full'] < 0.8 * temps['none'], temps


def test_the_memory_scheduler_changes_no_result_and_lowers_temporaries():
  """`train_lib.compiler_options`: on CPU the step is scheduled for memory.
  Two steps give bitwise the same state and metrics as XLA's default
  schedule, with fewer temporaries."""
  config = _config()
  mesh = _one_device_mesh()
  lowered = step_audit.lower_train_step(config, mesh)
  default = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_DEFAULT'}
  initial = _initial(config)
  batch = sharding.global_batch(_batch(config), mesh)
  results, temps = [], []
  for compiled in (lowered.compile(), lowered.compile(default)):
    state = jax.device_put(initial, sharding.replicated(mesh))
    for _ in range(2):
      state, metrics = compiled(state, batch)
    results.append(jax.device_get((state, metrics)))
    temps.append(step_audit.memory(compiled)['temporaries'])
  _assert_bitwise(results[0], results[1])
  assert temps[0] < temps[1], temps


def test_unknown_remat_is_a_config_error():
  with pytest.raises(config_checks.ConfigError, match="'block'"):
    config_checks.validate(_config({'model.remat': 'block'}), 8)


# -------------------------------------------------- spatial partitioning


def test_spatial_partitioning_equals_the_unpartitioned_step():
  """model = 2 and 4: the loss, metrics and updated state of one step
  equal the data-parallel step's (the same global batch)."""
  config = _config()
  initial, batch = _initial(config), _batch(config)
  ref_state, ref_metrics = _step(config, sharding.create_mesh(config.mesh),
                                 initial, batch)
  for k in (2, 4):
    part = _config(model=k)
    mesh = sharding.create_mesh(part.mesh)
    assert mesh.shape == {'data': 8 // k, 'model': k}
    state, metrics = _step(part, mesh, initial, batch)
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'],
                               rtol=1e-5)
    for tree in ('params', 'batch_stats'):
      for a, b in zip(jax.tree.leaves(getattr(state, tree)),
                      jax.tree.leaves(getattr(ref_state, tree))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_spatially_partitioned_forward_equals_and_is_split():
  config = _config(model=4)
  model = models.build_model(config)
  batch = _batch(config)
  variables = jax.jit(lambda: model.init(jax.random.key(0), batch['image'][:1]))()
  ref = jax.jit(lambda v, x: model.apply(v, x))(variables, batch['image'])
  mesh = sharding.create_mesh(config.mesh)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda v, b: model.apply(
        v, sharding.partition_images(b, mesh)['image']))
    out = fn(variables, sharding.global_batch(batch, mesh))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  level3 = out['cls_outputs'][3]
  assert level3.sharding.shard_shape(level3.shape)[1] == level3.shape[1] // 4


def test_image_height_must_divide_by_k_times_top_level():
  with pytest.raises(config_checks.ConfigError,
                     match=r'mesh.model x 2\*\*max_level = 4 x 32 = 128'):
    config_checks.validate(_config({'data.image_size': 96,
                                    'data.shapes_image_size': 96}, model=4), 8)


# -------------------------------------------------------- collective audit


def _step_collectives(config, image_size=None, state_shardings=None):
  with config.unlocked():
    config.data.image_size = image_size or config.data.image_size
  compiled = step_audit.lower_train_step(config, None,
                                         state_shardings).compile()
  return step_audit.collectives(compiled)


def test_data_parallel_step_reduces_gradients_and_bn_statistics_only():
  config = _config()
  shapes = jax.eval_shape(lambda: models.build_model(config).init(
      jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
  found = _step_collectives(config)
  assert step_audit.audit_data_parallel(found, shapes['params'],
                                        shapes['batch_stats']) == []
  assert _step_collectives(_config(), 256) == found  # Not with image size.


@pytest.mark.parametrize('model', [1, 2, 4])
def test_a_weight_shared_across_levels_is_reduced_once(model):
  """`summed_param_grads` under a data-parallel or spatially partitioned
  mesh: JAX's gradient, with one all-reduce of the kernel's bytes instead of
  one per level (and axis); with the height split, the halo rows are the
  only other traffic."""
  def conv(params, x):
    return jax.lax.conv_general_dilated(
        x, params['kernel'], (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  keys = jax.random.split(jax.random.key(0), 7)
  params = {'kernel': jax.random.normal(keys[0], (3, 3, 4, 8))}
  sizes = (16, 8, 4)
  xs = [jax.random.normal(k, (8, s, s, 4)) for k, s in zip(keys[1:], sizes)]
  dys = [jax.random.normal(k, (8, s, s, 8)) for k, s in zip(keys[4:], sizes)]
  want = jax.jit(jax.grad(lambda p: sum(jnp.vdot(conv(p, x), dy)
                                        for x, dy in zip(xs, dys))))(params)
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({'data': -1, 'model': model}))
  images = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data', 'model'))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, xs, dys: sharding_utils.summed_param_grads(
        conv, p, xs, dys, halo=1), in_shardings=(sharding.replicated(mesh),
                                                 images, images))
    compiled = fn.lower(params, xs, dys).compile()
    got = compiled(params, xs, dys)
  scale = float(jnp.abs(want['kernel']).max())
  np.testing.assert_allclose(got['kernel'], want['kernel'], rtol=1e-5,
                             atol=1e-5 * scale)
  found = step_audit.summarize(step_audit.collectives(compiled))
  assert found.pop('all-reduce') == (1, 4 * 3 * 3 * 4 * 8)
  if model > 1:  # One row of the device's `model` images from each side.
    row_bytes = sum(model * s * 4 * 4 for s in sizes)
    assert found.pop('collective-permute') == (2 * len(sizes), 2 * row_bytes)
  assert found == {}


def test_spatially_partitioned_step_reduces_what_data_parallel_does():
  """With the height on 'model', every gradient and batch-norm sum is an
  all-reduce over 'data' nested with one over 'model' (XLA:CPU runs both);
  folded into one, as XLA's AllReduceFolder folds them, the all-reduces are
  the data-parallel step's. A weight reduced per level (the head's shared
  convs) would not fold and would fail this."""
  config = _config(model=2)
  shapes = jax.eval_shape(lambda: models.build_model(config).init(
      jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
  compiled, text = step_audit.compile_with_partitioned_hlo(
      step_audit.lower_train_step(config))
  folded = step_audit.fold_nested(text)
  problems = step_audit.audit_data_parallel(folded, shapes['params'],
                                            shapes['batch_stats'])
  # Besides the halos, two small all-gathers over 'model' (256 B each).
  assert [p for p in problems if not p.startswith(
      ('unexpected collective-permute', 'unexpected all-gather'))] == []
  measured = step_audit.summarize(step_audit.collectives(compiled))
  assert measured['all-reduce'][1] > step_audit.summarize(folded)[
      'all-reduce'][1]  # XLA:CPU itself does not fold them.


def test_audit_fails_a_mis_sharded_step():
  """Weights sharded over 'data' by mistake: all-gathers appear."""
  def on_data(abstract, mesh):
    def spec(x):
      dims = [i for i, d in enumerate(x.shape) if d % 8 == 0]
      p = [None] * len(x.shape)
      if dims:
        p[dims[-1]] = 'data'
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*p))
    return jax.tree.map(spec, abstract)
  config = _config()
  shapes = jax.eval_shape(lambda: models.build_model(config).init(
      jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
  found = _step_collectives(config, state_shardings=on_data)
  problems = step_audit.audit_data_parallel(found, shapes['params'],
                                            shapes['batch_stats'])
  assert any(p.startswith('unexpected all-gather') for p in problems), problems


def test_collectives_parse_sync_async_and_tuples():
  hlo = '\n'.join([
      '  %ar = f32[3,3,8,16]{3,2,1,0} all-reduce(f32[3,3,8,16] %g), '
      'channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add',
      '  %t = (f32[16]{0}, bf16[4,2]{1,0}) all-reduce(%a, %b), '
      'replica_groups=[2,4]<=[8], to_apply=%add',
      '  %ag = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%x), '
      'dimensions={0}',
      '  %agd = f32[8,8]{1,0} all-gather-done(%ag)',
      '  %cp = (f32[1,4,8]{2,1,0}, f32[1,4,8]{2,1,0}, u32[], u32[]) '
      'collective-permute-start(%h), source_target_pairs={{0,1},{1,0}}'])
  found = step_audit.collectives(hlo)
  assert [(c.op, c.bytes) for c in found] == [
      ('all-reduce', 4 * 1152), ('all-reduce', 16 * 4 + 8 * 2),
      ('all-gather', (16 + 64) * 4), ('collective-permute', 32 * 4)]
  assert [c.groups for c in found[:2]] == ['{{0,1},{2,3}}', '[2,4]<=[8]']


# ---------------------------------------------------------- multi-slice


def _fake_devices(slices, per_slice, with_slice=True):
  out = []
  for i in range(slices * per_slice):
    d = types.SimpleNamespace(id=i, process_index=i // per_slice,
                              platform='cpu', device_kind='cpu')
    if with_slice:
      d.slice_index = i // per_slice
    out.append(d)
  return out


def test_hybrid_mesh_keeps_model_inside_a_slice_and_data_slice_major():
  devices = _fake_devices(slices=2, per_slice=8)
  array = sharding.hybrid_devices(8, 2, 2, devices)
  assert array.shape == (8, 2)
  slice_of = np.vectorize(lambda d: d.slice_index)(array)
  np.testing.assert_array_equal(slice_of[:4], 0)
  np.testing.assert_array_equal(slice_of[4:], 1)


def test_hybrid_mesh_without_slice_index_falls_back_to_processes(caplog):
  devices = _fake_devices(slices=2, per_slice=4, with_slice=False)
  array = sharding.hybrid_devices(8, 1, 2, devices)
  assert array.shape == (8, 1)
  assert 'no slice_index' in caplog.text
  with pytest.raises(ValueError, match='cannot stand in for 4 slices'):
    sharding.hybrid_devices(8, 1, 4, devices)


def test_slices_must_divide_the_data_axis():
  config = _config(model=2, slices=3)
  with pytest.raises(config_checks.ConfigError, match='mesh.slices'):
    config_checks.validate(config, 8)


def test_one_slice_mesh_on_cpu_is_the_plain_mesh():
  mesh = sharding.create_mesh(_config(model=2, slices=1).mesh)
  assert mesh.shape == {'data': 4, 'model': 2}
