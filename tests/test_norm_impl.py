"""Batch norm with its gradient written out (spinenet_jax/norm_impl.py)
agrees with flax's BatchNorm differentiated by JAX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spinenet_jax as snj
from spinenet_jax import config_checks
from spinenet_jax import models
from spinenet_jax import norm_impl
from tests import tiny


def _rel(a, b, dtype=np.float32) -> float:
  a, b = np.asarray(a, dtype), np.asarray(b, dtype)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _apply_and_grad(module, variables, x, w):
  """Output, updated batch stats and the gradients (params, x) of a
  weighted sum of the output's sines."""
  def loss(params, x):
    y, state = module.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            x, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w), (y, state)
  (_, (y, state)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(variables['params'], x)
  return y, state, grads


@pytest.mark.parametrize('shape,offset', [((2, 8, 8, 16), 0.0),
                                          ((2, 8, 8, 16), 4.0),
                                          ((1, 5, 3, 4), 1.0),
                                          ((3, 33), -2.0)])
def test_fused_matches_flax(shape, offset):
  """Outputs, moving statistics and gradients of x, scale and bias, with
  non-trivial scale and bias, and inputs whose mean is off zero."""
  kx, kw, kp = jax.random.split(jax.random.key(0), 3)
  x = 3.0 * jax.random.normal(kx, shape) + offset
  w = jax.random.normal(kw, shape)
  kw_ = dict(momentum=0.9, epsilon=1e-3, dtype=jnp.float32)
  flax_bn = nn.BatchNorm(use_running_average=False, **kw_)
  fused = norm_impl.FusedBatchNorm(**kw_)
  variables = flax_bn.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, fused.init(jax.random.key(1), x)) ==
          jax.tree.map(jnp.shape, variables))
  variables = jax.tree.map(
      lambda v: v + 0.3 * jax.random.normal(kp, v.shape), variables)
  ref = _apply_and_grad(flax_bn, variables, x, w)
  got = _apply_and_grad(fused, variables, x, w)
  y_ref, state_ref, grads_ref = ref
  y, state, grads = got
  assert _rel(y, y_ref) < 1e-5
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref)):
    assert _rel(a, b) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel(a, b) < 1e-4


def test_mean_and_var_cotangents():
  """Gradients through the returned mean and variance too (zero in a
  training step, where they only feed the moving averages)."""
  x = 2.0 * jax.random.normal(jax.random.key(2), (4, 6, 8)) + 1.0
  scale = jnp.linspace(0.5, 1.5, 8)
  bias = jnp.linspace(-1.0, 1.0, 8)
  u, v = jnp.arange(8.0), jnp.cos(jnp.arange(8.0))

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias, 1e-3)
      return jnp.sum(jnp.sin(y)) + jnp.sum(mean * u) + jnp.sum(var * v)
    return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

  derived = lambda *a: norm_impl._forward(*a)[0]  # pylint: disable=protected-access
  for a, b in zip(loss(norm_impl.batch_norm_train), loss(derived)):
    assert _rel(a, b) < 1e-5


def test_bfloat16_inputs_keep_their_dtype():
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8), jnp.bfloat16)
  fused = norm_impl.FusedBatchNorm(dtype=jnp.bfloat16)
  variables = fused.init(jax.random.key(0), x)
  y, state, grads = _apply_and_grad(fused, variables, x, jnp.ones(x.shape))
  assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  assert grads[0]['scale'].dtype == jnp.float32
  assert state['batch_stats']['mean'].dtype == jnp.float32
  y_ref, _, grads_ref = _apply_and_grad(
      nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16), variables,
      x, jnp.ones(x.shape))
  assert _rel(y, y_ref) < 1e-2
  assert _rel(grads[1], grads_ref[1]) < 5e-2


def test_auto_picks_fused_on_cpu_only():
  assert norm_impl.resolve('auto') == (
      'fused' if jax.default_backend() == 'cpu' else 'flax')
  assert norm_impl.resolve('flax') == 'flax'


def test_unknown_norm_impl_is_a_config_error():
  config = ml_collections.ConfigDict(dict(
      task='retinanet', model=dict(model_id='49', norm_impl='cudnn')))
  with pytest.raises(ValueError, match=r"norm_impl='cudnn'.*'auto'"):
    models.build_model(config)
  with pytest.raises(ValueError, match='norm_impl'):
    config_checks.check_model(config)


@pytest.mark.parametrize('model_id,specs', [
    ('49', tiny.TINY_SPECS), ('49_mobile', tiny.TINY_MOBILE_SPECS)])
def test_model_training_step_agrees(model_id, specs):
  """Every batch norm of a tiny SpineNet / SpineNet-Mobile RetinaNet in
  training mode (batch statistics), fused vs flax: outputs, moving
  statistics and parameter gradients, in float64 so that the comparison
  is of the arithmetic, not of float32 rounding: batch statistics of a
  2-image batch amplify rounding (at 256 px in float32, both sides are
  within 1e-4 of the float64 gradients and within 1.1e-4 of each other;
  at 128 px, levels 6 and 7 normalise over 8 and 2 values).

  A gradient that is zero in exact arithmetic (the head's tower-conv and
  some projection biases, which the batch norm after them cancels) is
  rounding noise on both sides; it is checked against the largest."""
  kw = dict(model_id=model_id, num_classes=5, filter_size_scale=0.125,
            endpoints_num_filters=16, head_num_convs=1, head_num_filters=16,
            block_specs=specs, dtype=jnp.float64)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3), jnp.float64)
    variables = jax.jit(lambda x: snj.RetinaNet(**kw).init(
        jax.random.key(0), x))(x)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)

    def step(impl):
      model = snj.RetinaNet(norm_impl=impl, **kw)

      def loss(params):
        out, state = model.apply(
            {'params': params, 'batch_stats': variables['batch_stats']}, x,
            train=True, mutable=['batch_stats'])
        return sum(jnp.sum(o**2) for o in jax.tree.leaves(out)), (out,
                                                                  state)
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(
          variables['params'])

    (_, ref), grads_ref = step('flax')
    (_, got), grads = step('fused')
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert _rel(a, b, np.float64) < 1e-12
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  worst, zero = 0.0, 0
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    if float(jnp.max(jnp.abs(b))) < 1e-12 * largest:
      zero += 1
      assert float(jnp.max(jnp.abs(a))) < 1e-12 * largest
    else:
      worst = max(worst, _rel(a, b, np.float64))
  assert zero < len(jax.tree.leaves(grads)) // 4 and worst < 1e-10, (
      zero, worst)
