"""Convolution lowerings (spinenet_jax/conv_impl.py) agree with XLA's."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spinenet_jax as snj
from spinenet_jax import conv_impl
from spinenet_jax import layers
from spinenet_jax import models
from spinenet_jax import winograd
from tests import tiny


def _rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize('impl', ['im2col', 'im2col_grad', 'winograd'])
@pytest.mark.parametrize('batch,h,w,cin,cout,k,s', [
    (2, 2, 2, 8, 5, 3, 1),     # map smaller than the kernel
    (1, 5, 7, 4, 6, 3, 2),     # odd sizes, strided: TF 'SAME' pads 0/1
    (2, 16, 16, 3, 8, 7, 2),   # the stem's 7x7/2
    (1, 9, 4, 8, 8, 3, 1),
    (2, 1, 1, 6, 4, 3, 2),     # level 7 of a 128-pixel image
    (1, 6, 6, 4, 4, 5, 1),
    (2, 9, 13, 16, 12, 3, 1),  # Winograd: neither side a multiple of 4
    (1, 24, 20, 64, 40, 3, 1),
])
def test_matmul_lowerings_match_xla(batch, h, w, cin, cout, k, s, impl):
  x = jax.random.normal(jax.random.key(0), (batch, h, w, cin))
  kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  ct = jax.random.normal(jax.random.key(2), (batch, -(-h // s), -(-w // s),
                                             cout))

  def run(impl):
    f = lambda x, kernel: conv_impl.conv(x, kernel, s, impl)
    y, vjp = jax.vjp(f, x, kernel)
    return y, vjp(ct)
  (y, grads), (y_ref, grads_ref) = jax.jit(run, static_argnums=0)(
      impl), jax.jit(run, static_argnums=0)('xla')
  assert y.shape == y_ref.shape
  assert _rel(y, y_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-4


def test_winograd_transforms_compute_a_correlation():
  """F(4, 3) in one dimension, in float64: AT [(G g) * (BT d)] gives the
  4 outputs of the 3-tap correlation of the 6 samples d."""
  rng = np.random.default_rng(0)
  for _ in range(5):
    d, g = rng.normal(size=6), rng.normal(size=3)
    want = [d[i:i + 3] @ g for i in range(4)]
    got = winograd.AT @ ((winograd.G @ g) * (winograd.BT @ d))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_winograd_computes_bfloat16_in_float32():
  x = jax.random.normal(jax.random.key(0), (1, 12, 12, 16))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 8))
  want = conv_impl.conv(x, kernel, 1, 'xla')
  bf16 = lambda a: a.astype(jnp.bfloat16)
  got = winograd.conv(bf16(x), bf16(kernel))
  assert got.dtype == jnp.bfloat16
  # bfloat16's rounding of the inputs and the output (as XLA's convolution
  # of the same inputs has it), not more from the transforms.
  xla = conv_impl.conv(bf16(x), bf16(kernel), 1, 'xla')
  assert _rel(got, want) <= 1.2 * _rel(xla, want)


def test_winograd_rejects_other_kernels():
  with pytest.raises(ValueError, match='3x3'):
    winograd.conv(jnp.ones((1, 8, 8, 4)), jnp.ones((5, 5, 4, 4)))


@pytest.mark.parametrize('shape,cout', [((2, 8, 8, 16), 64), ((1, 5, 3, 64), 16),
                                        ((3, 4, 4, 7), 5)])
def test_matmul_gradients_match_jax_derived(shape, cout):
  """`conv_impl.matmul`'s written-out gradients are the einsum's."""
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (shape[-1], cout))
  ct = jax.random.normal(jax.random.key(2), shape[:3] + (cout,))

  def run(fn):
    y, vjp = jax.vjp(fn, x, kernel)
    return y, vjp(ct)
  y, grads = jax.jit(lambda: run(conv_impl.matmul))()
  y_ref, grads_ref = jax.jit(lambda: run(
      lambda x, k: jnp.einsum('bhwc,cd->bhwd', x, k)))()
  assert _rel(y, y_ref) < 1e-6
  for g, g_ref in zip(grads, grads_ref):
    assert g.shape == g_ref.shape
    assert _rel(g, g_ref) < 1e-5


def test_pointwise_auto_runs_matmul_on_cpu():
  """1x1 convolutions take the written-out gradients on CPU, and 'xla'
  keeps the einsum JAX differentiates (visible in the jaxpr)."""
  x, kernel = jnp.ones((2, 4, 4, 8)), jnp.ones((8, 3))
  jaxpr = lambda impl: str(jax.make_jaxpr(jax.grad(
      lambda k: layers.pointwise(x, k, impl).sum()))(kernel))
  assert 'custom_vjp' in jaxpr('auto') and 'custom_vjp' in jaxpr('im2col')
  assert 'custom_vjp' not in jaxpr('xla')


def test_auto_picks_by_backend_size_and_width():
  assert jax.default_backend() == 'cpu'
  assert conv_impl.resolve('auto', (2, 64, 64, 16), 1) == 'im2col'  # 1x1
  assert conv_impl.resolve('xla', (2, 64, 64, 16), 1) == 'xla'
  assert conv_impl.resolve('auto', (2, 2, 2, 16), 3) == 'im2col'  # tiny map
  assert conv_impl.resolve('auto', (2, 8, 8, 256), 3) == 'im2col'  # wide
  # Larger maps (when not Winograd's): XLA's convolution, its kernel
  # gradient an im2col matmul from 128 input channels on.
  assert conv_impl.resolve('auto', (2, 32, 32, 128), 3, 2) == 'im2col_grad'
  assert conv_impl.resolve('auto', (2, 32, 32, 256), 3, 2) == 'im2col_grad'
  assert conv_impl.resolve('auto', (2, 32, 32, 64), 3) == 'xla'
  # The 7x7 stem's kernel gradient too, on images of 384 x 384 and more,
  # whatever the batch.
  assert conv_impl.resolve('auto', (1, 384, 384, 3), 7) == 'im2col_grad'
  assert conv_impl.resolve('auto', (64, 256, 256, 3), 7) == 'xla'
  assert conv_impl.resolve('xla', (2, 2, 2, 256), 3) == 'xla'
  assert conv_impl.resolve('im2col', (2, 64, 64, 8), 3) == 'im2col'
  # Winograd: 3x3, stride 1, maps from 16x16, 128 input channels on.
  assert conv_impl.resolve('auto', (2, 80, 80, 256), 3) == 'winograd'
  assert conv_impl.resolve('auto', (8, 16, 16, 128), 3) == 'winograd'
  assert conv_impl.resolve('auto', (2, 80, 80, 256), 3, 2) == 'im2col_grad'
  assert conv_impl.resolve('auto', (2, 12, 12, 256), 3) == 'im2col'
  assert conv_impl.resolve('auto', (2, 160, 160, 64), 3) == 'xla'
  # Forced, it takes every 3x3 stride-1 convolution and leaves the rest
  # to 'auto'.
  assert conv_impl.resolve('winograd', (2, 2, 2, 8), 3) == 'winograd'
  assert conv_impl.resolve('winograd', (2, 2, 2, 8), 3, 2) == 'im2col'
  assert conv_impl.resolve('winograd', (2, 64, 64, 3), 7, 2) == 'xla'
  assert conv_impl.resolve('winograd', (2, 64, 64, 8), 1) == 'im2col'


def test_unknown_conv_impl_is_a_config_error():
  config = ml_collections.ConfigDict(dict(
      task='retinanet', model=dict(model_id='49', conv_impl='fast')))
  with pytest.raises(ValueError, match=r"conv_impl='fast'.*'auto'"):
    models.build_model(config)


@pytest.mark.parametrize('model_id,specs', [
    ('49', tiny.TINY_SPECS), ('49_mobile', tiny.TINY_MOBILE_SPECS)])
def test_model_outputs_and_gradients_agree_across_lowerings(model_id, specs):
  """Every conv as a matmul (im2col, 1x1 gradients written out), and every
  kxk one with its kernel gradient as a matmul (im2col_grad), vs every one
  as XLA derives it, on the tiny networks (SpineNet: 7x7/2 stem, 1x1 and 3x3
  bottleneck and residual convs, resampling, head; SpineNet-Mobile: MBConv
  expansions and projections, squeeze-excitation, separable head).

  Batch norm uses its moving statistics: with batch statistics, levels 6
  and 7 of a 2-image 128-pixel batch normalise over 8 and 2 values, which
  amplifies float rounding of any lowering (measured 1.5e-3 there, 3e-6 on
  the other levels; 6e-7 everywhere in inference mode).
  """
  kw = dict(model_id=model_id, num_classes=5, filter_size_scale=0.125,
            endpoints_num_filters=16, head_num_convs=1, head_num_filters=16,
            block_specs=specs)
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

  (_, out_ref), grads_ref = value_and_grad('xla')
  for impl in ('im2col', 'im2col_grad', 'winograd'):
    (_, out), grads = value_and_grad(impl)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
      assert _rel(a, b) < 1e-5, impl
    worst = max(_rel(a, b) for a, b in zip(jax.tree.leaves(grads),
                                           jax.tree.leaves(grads_ref)))
    assert worst < 1e-4, (impl, worst)
