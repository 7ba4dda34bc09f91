"""Model Garden checkpoint import (spinenet_jax.convert_model_garden).

The unit tests write fake Model Garden checkpoints from our own variables
(the inverse mapping, with the functional layer positions shuffled) and
check the round trip and the error messages. The parity test needs
tf-models-official (`make parity` installs it into .venv-parity): it builds
Model Garden's own SpineNet RetinaNet with random weights, converts its
checkpoint and compares the outputs.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spinenet_jax as snj
from spinenet_jax import convert_model_garden as cmg
from tests import model_garden_fakes as fakes

SMALL = dict(filter_size_scale=0.25, endpoints_num_filters=16,
             head_num_filters=8, head_num_convs=2)


def _variables(model, size=128, seed=1):
  """Random variables of the model's shapes (no init: no compilation)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False))
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  leaves = [rng.uniform(0.5, 1.5, x.shape).astype(np.float32) *
            rng.choice([-1, 1], x.shape).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(tree, leaves)


def _equal(a, b):
  return jax.tree.all(jax.tree.map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


@pytest.mark.parametrize('model_id,kw', [
    ('49', SMALL), ('96', SMALL),
    ('49_mobile', dict(filter_size_scale=0.5, endpoints_num_filters=16,
                       head_num_filters=8, head_num_convs=2))])
def test_round_trip_arrays(model_id, kw):
  model = snj.RetinaNet(model_id=model_id, num_classes=3, **kw)
  v = _variables(model)
  arrays, names = fakes.model_garden_layout(model, v, order_seed=3)
  # Model Garden's dead level-2 block carries no weights; so do we.
  if not model.is_mobile:
    assert not any(p.startswith(('block17_', 'resample17_'))
                   for _, p in cmg.expected_backbone_layers(model))
  out = cmg.convert_arrays(arrays, names, model, 'retinanet')
  assert _equal(out, dict(v))


def test_convert_writes_a_run_load_checkpoint_opens(tmp_path):
  model = snj.RetinaNet(model_id='49', num_classes=3, **SMALL)
  v = _variables(model)
  arrays, names = fakes.model_garden_layout(model, v, order_seed=5)
  prefix = fakes.write_tf_checkpoint(str(tmp_path / 'tf' / 'ckpt-1'), arrays,
                                     names)
  out = tmp_path / 'run'
  rc = cmg.main([f'--checkpoint={prefix}', '--model=49', '--task=retinanet',
                 f'--output={out}', '--image_size=128'])
  # The CLI cannot know the test's tiny width: it reports what does not fit.
  assert rc == 1
  config, _ = cmg.convert(prefix, '49', 'retinanet', str(out),
                          image_size=128,
                          model_overrides=dict(filter_size_scale=0.25))
  # Inferred from the checkpoint: head width/convs, endpoints, classes.
  assert config.model.num_classes == 3
  assert config.model.endpoints_num_filters == 16
  assert config.model.head_num_convs == 2
  run = snj.load_checkpoint(str(out))
  assert _equal(run.variables, dict(v))
  assert run.config.data.image_size == 128


def test_backbone_only(tmp_path):
  model = snj.RetinaNet(model_id='49', num_classes=5, **SMALL)
  v = _variables(model)
  arrays, names = fakes.model_garden_layout(model, v, root='backbone/')
  arrays = {k: a for k, a in arrays.items() if k.startswith('backbone/')}
  with pytest.raises(cmg.ConversionError, match='no RetinaNet head'):
    cmg.convert_arrays(arrays, names, model, 'retinanet')
  out = cmg.convert_arrays(arrays, names, model, 'retinanet',
                           backbone_only=True)
  assert _equal(out['params']['backbone'], v['params']['backbone'])
  assert set(out['params']['head']) == set(v['params']['head'])


def test_errors_name_every_problem():
  model = snj.RetinaNet(model_id='49', num_classes=3, **SMALL)
  v = _variables(model)
  arrays, names = fakes.model_garden_layout(model, v)
  key_missing = next(k for k in arrays if '_box_convs/1/kernel' in k)
  key_shape = next(k for k in arrays if '_classifier/kernel' in k)
  arrays.pop(key_missing)
  arrays[key_shape] = arrays[key_shape][..., :-1]
  arrays['model/_head/_extra/kernel' + cmg.ATTR] = np.zeros(3, np.float32)
  with pytest.raises(cmg.ConversionError) as e:
    cmg.convert_arrays(arrays, names, model, 'retinanet')
  msg = str(e.value)
  assert 'missing variable for params/head/box_conv1/kernel' in msg
  assert 'wrong shape: ' + key_shape in msg
  assert 'unexpected variable model/_head/_extra/kernel' in msg
  # A different width: every mismatching backbone layer is named.
  other = snj.RetinaNet(model_id='49', num_classes=3,
                        **dict(SMALL, filter_size_scale=0.5))
  arrays, names = fakes.model_garden_layout(model, v)
  with pytest.raises(cmg.ConversionError, match='wrong shape: .*backbone'):
    cmg.convert_arrays(arrays, names, other, 'retinanet')
  # A different depth (96 has block repeats 2): layer counts differ.
  with pytest.raises(cmg.ConversionError, match='bottleneck_block layers'):
    cmg.convert_arrays(arrays, names, snj.RetinaNet(
        model_id='96', num_classes=3, **SMALL), 'retinanet')


# --------------------------------------------------------------------------
# Parity with TF Model Garden itself (only where tf-models-official is
# installed: `make parity`).

PARITY_IDS = os.environ.get('PARITY_MODEL_IDS', '49S,49,96,49_mobile').split(',')


def _randomize_mg(model, seed=0):
  """Random BN statistics, gammas, betas and head weights (not tiny)."""
  rng = np.random.default_rng(seed)
  for var in model.variables:
    name, shape = var.name, var.shape.as_list()
    if 'gamma' in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif 'beta' in name or 'moving_mean' in name:
      value = rng.normal(0, 0.2, shape)
    elif 'moving_variance' in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif 'head' in name and 'bias' in name:
      value = rng.normal(0, 0.1, shape)
    elif 'head' in name:  # Predictor kernels start at std 1e-5.
      fan_in = np.prod(shape[:-1]) if 'depthwise' not in name else 9
      value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
    else:
      continue
    var.assign(value.astype(np.float32))


def _mg_backbone_and_head(model_id: str, size: int):
  """Model Garden's own SpineNet(-Mobile) and RetinaNet head (91 classes)."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.backbones import spinenet  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.backbones import spinenet_mobile  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.heads import dense_prediction_heads  # pylint: disable=g-import-not-at-top
  from spinenet_jax import specs  # pylint: disable=g-import-not-at-top

  spec = tf_keras.layers.InputSpec(shape=[None, size, size, 3])
  if specs.is_mobile(model_id):
    s = specs.get_mobile_scaling(model_id)
    act = s.activation
    backbone = spinenet_mobile.SpineNetMobile(
        input_specs=spec, activation=act, se_ratio=0.2, expand_ratio=6,
        **spinenet_mobile.SCALING_MAP[model_id[:-len('_mobile')]])
  else:
    s = specs.get_scaling(model_id)
    act = 'swish'
    backbone = spinenet.SpineNet(input_specs=spec, activation=act,
                                 **spinenet.SCALING_MAP[model_id])
  head = dense_prediction_heads.RetinaNetHead(
      min_level=3, max_level=7, num_classes=91, num_anchors_per_location=9,
      activation=act, num_convs=s.head_num_convs,
      num_filters=s.head_num_filters,
      use_separable_conv=specs.is_mobile(model_id))
  return backbone, head


@pytest.mark.parametrize('model_id', PARITY_IDS)
def test_parity_with_model_garden(model_id, tmp_path):
  pytest.importorskip('official')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  from official.vision.modeling import retinanet_model  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.layers import detection_generator  # pylint: disable=g-import-not-at-top

  size = 256
  tf_keras.utils.set_random_seed(0)
  backbone, head = _mg_backbone_and_head(model_id, size)
  model = retinanet_model.RetinaNetModel(
      backbone, None, head, detection_generator.MultilevelDetectionGenerator(),
      min_level=3, max_level=7, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0],
      anchor_size=3)
  x = np.random.default_rng(1).normal(size=(1, size, size, 3)).astype(
      np.float32)
  model(x, training=False)
  _randomize_mg(model)
  feats = model.backbone(x, training=False)
  scores, boxes, _ = model.head(feats, training=False)
  prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / 'mg' / 'ckpt'))

  out = str(tmp_path / 'run')
  assert cmg.main([f'--checkpoint={prefix}', f'--model={model_id}',
                   '--task=retinanet', f'--output={out}']) == 0
  run = snj.load_checkpoint(out)
  got = run.model.apply(run.variables, x, train=False)
  worst = 0.0
  for name, want in (('cls_outputs', scores), ('box_outputs', boxes)):
    for level in range(3, 8):
      w = np.asarray(want[str(level)])
      g = np.asarray(got[name][level])
      assert g.shape == w.shape, (name, level, g.shape, w.shape)
      err = np.abs(g - w).max() / np.abs(w).max()
      worst = max(worst, err)
      assert err < 1e-4, (model_id, name, level, err)
  print(f'PARITY SpineNet-{model_id}: max relative error {worst:.2e}')


def _mg_graph_macs(fn, shape) -> int:
  """Conv and matmul multiply-adds in the TF graph of `fn` on `shape`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = tf.function(fn).get_concrete_function(
      tf.TensorSpec(shape, tf.float32)).graph
  total = 0
  for op in graph.get_operations():
    if op.type not in ('Conv2D', 'DepthwiseConv2dNative', 'MatMul'):
      continue
    out = int(np.prod(op.outputs[0].shape.as_list()))
    k = op.inputs[1].shape.as_list()
    total += out * {'Conv2D': k[0] * k[1] * k[2],
                    'DepthwiseConv2dNative': k[0] * k[1],
                    'MatMul': k[0]}[op.type]
  return total


@pytest.mark.parametrize('model_id,size', [
    ('49_mobile', 384), ('49S_mobile', 384), ('49XS_mobile', 256),
    ('49S', 256), ('49', 256)])
def test_parity_macs_with_model_garden(model_id, size):
  """Our summary's MACs equal those counted in Model Garden's own TF graph.

  This pins the published-size tables to the model itself: Model Garden's
  Mobile-49XS RetinaNet at 256 has 165,764,892 conv multiply-adds, as ours
  does (0.17B to two decimals). 49S is compared with Model Garden's
  128-channel endpoints.
  """
  pytest.importorskip('official')
  from spinenet_jax import specs, summary  # pylint: disable=g-import-not-at-top

  backbone, head = _mg_backbone_and_head(model_id, size)
  # MG's 49S has 128-channel endpoints; ours defaults to 256.
  width = backbone.output_specs['3'].as_list()[-1]
  want = _mg_graph_macs(
      lambda x: head(backbone(x, training=False), training=False),
      (1, size, size, 3))
  kw = {} if specs.is_mobile(model_id) else dict(endpoints_num_filters=width)
  got = summary.summarize(
      snj.RetinaNet(model_id=model_id, num_classes=91, **kw), size)['macs']
  print(f'MACS SpineNet-{model_id} @{size}: ours {got:,} Model Garden {want:,}')
  assert got == want
