"""kxk convolution lowerings (spinenet_jax/conv_impl.py) agree with XLA's."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spinenet_jax as snj
from spinenet_jax import conv_impl
from spinenet_jax import models
from tests import tiny


def _rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize('batch,h,w,cin,cout,k,s', [
    (2, 2, 2, 8, 5, 3, 1),     # map smaller than the kernel
    (1, 5, 7, 4, 6, 3, 2),     # odd sizes, strided: TF 'SAME' pads 0/1
    (2, 16, 16, 3, 8, 7, 2),   # the stem's 7x7/2
    (1, 9, 4, 8, 8, 3, 1),
    (2, 1, 1, 6, 4, 3, 2),     # level 7 of a 128-pixel image
    (1, 6, 6, 4, 4, 5, 1),
])
def test_im2col_matches_xla(batch, h, w, cin, cout, k, s):
  x = jax.random.normal(jax.random.key(0), (batch, h, w, cin))
  kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  ct = jax.random.normal(jax.random.key(2), (batch, -(-h // s), -(-w // s),
                                             cout))

  def run(impl):
    f = lambda x, kernel: conv_impl.conv(x, kernel, s, impl)
    y, vjp = jax.vjp(f, x, kernel)
    return y, vjp(ct)
  (y, grads), (y_ref, grads_ref) = jax.jit(run, static_argnums=0)(
      'im2col'), jax.jit(run, static_argnums=0)('xla')
  assert y.shape == y_ref.shape
  assert _rel(y, y_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-4


def test_auto_picks_by_backend_size_and_width():
  assert jax.default_backend() == 'cpu'
  assert conv_impl.resolve('auto', (2, 2, 2, 16), 3) == 'im2col'  # tiny map
  assert conv_impl.resolve('auto', (2, 16, 16, 256), 3) == 'im2col'  # wide
  assert conv_impl.resolve('auto', (2, 16, 16, 128), 3) == 'xla'
  assert conv_impl.resolve('auto', (2, 32, 32, 256), 3) == 'xla'
  assert conv_impl.resolve('xla', (2, 2, 2, 256), 3) == 'xla'
  assert conv_impl.resolve('im2col', (2, 64, 64, 8), 3) == 'im2col'


def test_unknown_conv_impl_is_a_config_error():
  config = ml_collections.ConfigDict(dict(
      task='retinanet', model=dict(model_id='49', conv_impl='fast')))
  with pytest.raises(ValueError, match=r"conv_impl='fast'.*'auto'"):
    models.build_model(config)


def test_model_outputs_and_gradients_agree_across_lowerings():
  """Every kxk conv as im2col vs every one as XLA's, on the tiny network
  (7x7/2 stem, 3x3 bottleneck and residual convs, 3x3/2 resampling, head).

  Batch norm uses its moving statistics: with batch statistics, levels 6
  and 7 of a 2-image 128-pixel batch normalise over 8 and 2 values, which
  amplifies float rounding of any lowering (measured 1.5e-3 there, 3e-6 on
  the other levels; 6e-7 everywhere in inference mode).
  """
  kw = dict(model_id='49', num_classes=5, filter_size_scale=0.125,
            endpoints_num_filters=16, head_num_convs=1, head_num_filters=16,
            block_specs=tiny.TINY_SPECS)
  x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
  xla = snj.RetinaNet(conv_impl='xla', **kw)
  variables = jax.jit(lambda x: xla.init(jax.random.key(0), x))(x)

  def value_and_grad(impl):
    model = snj.RetinaNet(conv_impl=impl, **kw)

    def loss(params):
      out = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x)
      return sum(jnp.sum(o**2) for o in jax.tree.leaves(out)), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  (_, out), grads = value_and_grad('im2col')
  (_, out_ref), grads_ref = value_and_grad('xla')
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
    assert _rel(a, b) < 1e-5
  worst = max(_rel(a, b) for a, b in zip(jax.tree.leaves(grads),
                                         jax.tree.leaves(grads_ref)))
  assert worst < 1e-4, worst
