"""Model zoo: published sizes, spec validation, forward/backward behaviour."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spinenet_jax as snj
from spinenet_jax import specs
from spinenet_jax import summary

# Reduced-width SpineNet-49: same permutation, small widths.
TINY = dict(model_id='49', filter_size_scale=0.125, endpoints_num_filters=16,
            head_num_convs=1, head_num_filters=16)


def num_params(model, size=128):
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('model_id,expected', [
    ('49S', 11.94e6), ('49', 28_543_383), ('96', 42.98e6), ('143', 66.96e6),
    ('190', 163.64e6)])
def test_retinanet_params_match_published(model_id, expected):
  n = num_params(snj.RetinaNet(model_id=model_id, num_classes=91))
  assert abs(n - expected) / expected < 1e-3, n
  if model_id == '49':
    assert n == expected  # Exactly Model Garden's TF model.


@pytest.mark.parametrize('model_id,expected', [
    ('49', 22.09e6), ('96', 36.52e6), ('143', 60.51e6), ('190', 127.10e6)])
def test_classifier_params_match_published(model_id, expected):
  n = num_params(snj.Classifier(model_id=model_id, num_classes=1001))
  assert abs(n - expected) / expected < 1e-3, n


@pytest.mark.parametrize('model_id,size,expected', [
    ('49S', 640, 33.7e9), ('49', 640, 85.3e9), ('96', 1024, 265.0e9)])
def test_macs_match_published(model_id, size, expected):
  s = summary.summarize(snj.RetinaNet(model_id=model_id), size)
  assert abs(s['macs'] - expected) / expected < 0.01, s['macs']
  assert s['outputs']['cls_outputs']['3'] == [1, size // 8, size // 8, 819]
  assert s['outputs']['box_outputs']['7'] == [1, size // 128, size // 128, 36]


def test_summary_json(capsys):
  from absl.testing import flagsaver
  with flagsaver.flagsaver(model='49S', image_size=256, json=True,
                           task='retinanet'):
    summary.FLAGS(['summary', '--model=49S'])
    summary.main([])
  import json
  out = json.loads(capsys.readouterr().out)
  assert isinstance(out['params'], int) and isinstance(out['macs'], int)
  assert out['params'] == 11_944_598


def _specs_with(i, **change):
  s = list(specs.SPINENET_BLOCK_SPECS)
  s[i] = s[i]._replace(**change)
  return s


@pytest.mark.parametrize('bad,match', [
    (_specs_with(3, input_offsets=(2, 5)), r'Block 3 .*input 5 refers to itself'),
    (_specs_with(3, input_offsets=(9, 2)), r'Block 3 .*input 9 refers to itself or a later'),
    (_specs_with(4, level=8), r'Block 4 .*level 8 is outside 1..7'),
    (_specs_with(4, level=0), r'Block 4 .*level 0 is outside 1..7'),
    (_specs_with(2, block_fn='mbconv'), r"Block 2 .*unknown block type 'mbconv'"),
    (_specs_with(11, is_output=False), r'no output block for level\(s\) \[3\]'),
    (_specs_with(10, level=5), r'Block 12 .*duplicate output for level 5'),
])
def test_invalid_block_specs_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    snj.SpineNet(block_specs=bad).init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)))


def test_unknown_model_id():
  with pytest.raises(ValueError, match=r"Unknown SpineNet model id '50'"):
    num_params(snj.SpineNet(model_id='50'))


def test_image_size_not_divisible():
  with pytest.raises(ValueError, match=r'divisible by 128.*got 200x200'):
    num_params(snj.SpineNet(**{k: v for k, v in TINY.items()
                               if not k.startswith('head')}), size=200)
  with pytest.raises(ValueError, match='divisible by 128.*got 200x256'):
    jax.eval_shape(lambda: snj.SpineNet().init(
        jax.random.key(0), jnp.zeros((1, 200, 256, 3))))


def test_custom_permutation_builds_and_runs():
  # A shorter permutation: 8 blocks, outputs for levels 3..7.
  custom = [
      (3, 'bottleneck', (0, 1), False),
      (5, 'residual', (1, 2), False),
      (4, 'bottleneck', (2, 3), True),
      (3, 'bottleneck', (2, 4), True),
      (6, 'residual', (3, 4), False),
      (5, 'bottleneck', (4, 6), True),
      (7, 'bottleneck', (5, 6), True),
      (6, 'bottleneck', (6, 8), True),
  ]
  config = ml_collections.ConfigDict({
      'task': 'retinanet', 'dtype': 'float32',
      'model': dict(TINY, block_specs=custom, num_classes=4)})
  model = snj.build_model(config)
  x = jnp.ones((1, 128, 128, 3))
  out, _ = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x))(x)
  assert sorted(out['cls_outputs']) == [3, 4, 5, 6, 7]
  assert out['cls_outputs'][5].shape == (1, 4, 4, 9 * 4)


def test_stem_filters():
  """The stem is 64 channels (Model Garden) unless `stem_filters` is set."""
  def stem_kernel(**kw):
    v = jax.eval_shape(lambda: snj.RetinaNet(
        num_classes=4, filter_size_scale=0.25, **kw).init(
            jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    return v['params']['backbone']['stem_conv']['conv']['kernel'].shape
  assert stem_kernel() == (7, 7, 3, 64)
  assert stem_kernel(stem_filters=16) == (7, 7, 3, 16)


def test_build_model_rejects_unknown_field():
  config = ml_collections.ConfigDict(
      {'task': 'retinanet', 'model': {'model_id': '49', 'num_clases': 3}})
  with pytest.raises(ValueError, match=r"\['num_clases'\]"):
    snj.build_model(config)


def test_backbone_head_and_anchors_methods():
  from spinenet_jax.detection import anchors as anchors_lib
  model = snj.RetinaNet(num_classes=4, bn_momentum=0.9, block_repeats=2,
                        min_level=4, **TINY)
  bb = model.backbone()  # Unbound, with the model's backbone fields.
  assert isinstance(bb, snj.SpineNet) and bb.parent is None
  assert (bb.bn_momentum, bb.block_repeats, bb.min_level) == (0.9, 2, 4)
  assert bb.setting('endpoints_num_filters') == 16 and bb.activation == 'swish'
  assert sorted(bb.plan()[2]) == [4, 5, 6, 7]
  assert isinstance(snj.RetinaNet(model_id='49S_mobile').backbone(),
                    snj.SpineNetMobile)
  assert snj.Classifier().backbone().resize_fallback
  assert not snj.RetinaNet().backbone().resize_fallback
  np.testing.assert_array_equal(
      model.anchors(128), anchors_lib.multilevel_anchors(
          128, min_level=4, anchor_size=3.0))
  head = model.head()
  assert (head.num_convs, head.num_filters, head.bn_momentum) == (1, 16, 0.9)


@pytest.fixture(scope='module')
def tiny():
  model = snj.RetinaNet(num_classes=5, stochastic_depth_rate=0.5, **TINY)
  x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
  return model, variables, x


def test_forward_backward_shapes_and_gradients(tiny):
  model, variables, x = tiny

  @jax.jit
  def loss_fn(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                         x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(2)})
    return sum(jnp.sum(o**2) for o in jax.tree.leaves(out)), out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  for level in range(3, 8):
    assert out['cls_outputs'][level].shape == (2, 128 >> level, 128 >> level, 45)
    assert out['box_outputs'][level].shape == (2, 128 >> level, 128 >> level, 36)
  assert np.isfinite(loss)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, dead


def test_stochastic_depth_only_in_training(tiny):
  model, variables, x = tiny
  apply = jax.jit(lambda k, train: model.apply(
      variables, x, train=train, rngs={'dropout': k}, mutable=['batch_stats'])[0]
      if train else model.apply(variables, x, train=False),
      static_argnums=1)
  a = apply(jax.random.key(0), True)['box_outputs'][3]
  b = apply(jax.random.key(1), True)['box_outputs'][3]
  assert not np.allclose(a, b)  # different drop masks
  c = apply(jax.random.key(0), False)['box_outputs'][3]
  d = apply(jax.random.key(1), False)['box_outputs'][3]
  np.testing.assert_array_equal(c, d)  # inference ignores the rng


def test_bfloat16_close_to_float32(tiny):
  model, variables, x = tiny
  f32 = jax.jit(lambda v: model.apply(v, x))(variables)
  bf16 = jax.jit(lambda v: model.clone(dtype=jnp.bfloat16).apply(v, x))(variables)
  for level in range(3, 8):
    a = np.asarray(f32['box_outputs'][level])
    b = np.asarray(bf16['box_outputs'][level])
    assert b.dtype == np.float32  # head outputs are float32
    assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(a)) + 1e-6


def test_classifier_any_size():
  model = snj.Classifier(num_classes=7, **{k: v for k, v in TINY.items()
                                           if not k.startswith('head')})
  x = jnp.ones((2, 96, 96, 3))
  out, _ = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x))(x)
  assert out.shape == (2, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (1, 7, 9, 2), (2, 6, 5, 1),
                                   (3, 11, 10, 4), (1, 2, 3, 2)])
def test_max_pool_gradient_matches_xla(shape):
  from flax import linen as nn
  from spinenet_jax import resample
  # Rounded values make ties, which must go to the first maximum as in XLA.
  x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  w = jnp.arange(ref(x).size, dtype=jnp.float32).reshape(ref(x).shape)
  np.testing.assert_array_equal(resample.max_pool(x), ref(x))
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
  g = jax.grad(lambda x: jnp.sum(resample.max_pool(x) * w))(x)
  np.testing.assert_array_equal(g, g_ref)
