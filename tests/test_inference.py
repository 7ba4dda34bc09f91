"""load_checkpoint / Run.features / detect / classify, the predict and draw CLIs.

A 2-step demo detection run is trained in-process once (module fixture, with
EMA on so that the EMA path is covered); the classification run directory is
written by hand (initial state saved with `checkpoints.save`, as training
does) to keep the runtime down.
"""

import importlib.util
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

import spinenet_jax
from spinenet_jax import checkpoints
from spinenet_jax import draw
from spinenet_jax import inference
from spinenet_jax import predict
from spinenet_jax import train_lib
from spinenet_jax.detection import postprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
  spec = importlib.util.spec_from_file_location(
      f'_cfg_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny(c, data_dir):
  c.data.data_dir = str(data_dir)
  c.data.num_train_examples = 32
  c.data.num_eval_examples = 8
  c.data.shapes_image_size = 128
  c.data.image_size = 128
  c.batch_size = 8
  c.total_steps = 2
  c.model.filter_size_scale = 0.125
  c.model.endpoints_num_filters = 16
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.async_checkpoints = False
  return c


@pytest.fixture(scope='module')
def det_workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('det')
  c = _tiny(_config('demo'), tmp / 'tfds')
  c.model.head_num_convs = 1
  c.model.head_num_filters = 16
  c.optimizer.ema_decay = 0.9
  train_lib.train_and_evaluate(c, str(tmp / 'run'))
  return str(tmp / 'run')


@pytest.fixture(scope='module')
def det_run(det_workdir):
  return spinenet_jax.load_checkpoint(det_workdir)


@pytest.fixture(scope='module')
def cls_workdir(tmp_path_factory):
  """A classification run directory as training writes it (step 3)."""
  tmp = tmp_path_factory.mktemp('cls')
  c = _tiny(_config('shapes_classification'), tmp / 'tfds')
  workdir = str(tmp / 'run')
  model = spinenet_jax.build_model(c)
  tx = train_lib.create_optimizer(c.optimizer, lambda s: 0.1)
  state = jax.jit(lambda: train_lib.init_state(model, tx, c))()
  state = state.replace(step=state.step + 3)
  checkpoints.save_config(workdir, c)
  manager = checkpoints.create_manager(workdir, async_save=False)
  checkpoints.save(manager, 3, state, force=True)
  manager.wait_until_finished()
  manager.close()
  return workdir, state


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (100, 150, 3), np.uint8),
          rng.integers(0, 256, (200, 90, 3), np.uint8)]


def test_load_checkpoint(det_run, det_workdir):
  run = det_run
  assert run.step == 2
  assert isinstance(run.model, spinenet_jax.RetinaNet)
  assert run.config.data.image_size == 128
  assert run.ema_params is not None
  # The EMA weights are the inference weights.
  assert run.variables['params'] is run.ema_params
  assert set(run.variables) == {'params', 'batch_stats'}
  # Same run through the step directory and an explicit step.
  again = inference.load_checkpoint(
      os.path.join(det_workdir, 'checkpoints', '2'))
  assert again.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.variables),
               jax.device_get(run.variables))
  with pytest.raises(FileNotFoundError, match='step 7'):
    inference.load_checkpoint(det_workdir, step=7)


def test_features(det_run):
  feats = det_run.features(_images())
  assert sorted(feats) == [3, 4, 5, 6, 7]
  for level, f in feats.items():
    assert f.shape == (2, 128 >> level, 128 >> level, 16)
    assert np.isfinite(f).all()


def test_detect_list_of_sizes(det_run):
  images = _images()
  det = det_run.detect(images, score_threshold=0.0, max_detections=20)
  assert det['boxes'].shape == (2, 20, 4)
  assert det['scores'].shape == det['classes'].shape == (2, 20)
  assert det['num_detections'].shape == (2,)
  for i, im in enumerate(images):
    n = int(det['num_detections'][i])
    assert n > 0
    boxes = det['boxes'][i, :n]
    h, w = im.shape[:2]
    # In the image's own pixels: inside it, and reaching beyond the network's
    # 128-pixel input for the 200-pixel-high image.
    assert (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= h + 1e-3).all()
    assert (boxes[:, [1, 3]] <= w + 1e-3).all()
    assert (det['classes'][i, :n] >= 1).all()
    assert (det['classes'][i, :n] <= 3).all()
    assert np.all(np.diff(det['scores'][i, :n]) <= 1e-6)
  # Same as running the model on the padded resized batch, boxes / scale.
  batch, scales, sizes = inference.detection_inputs(images, 128)
  np.testing.assert_allclose(scales, [128 / 150, 128 / 200], rtol=1e-6)
  assert batch.shape == (2, 128, 128, 3)
  assert np.all(batch[1, :, 58:] == 0)  # 90 * 0.64 = 57.6 -> 58 columns.
  out = det_run.model.apply(det_run.variables, batch, train=False)
  ec = det_run.config.eval
  ref = postprocess.detect(
      out['cls_outputs'], out['box_outputs'],
      train_lib.make_anchors(det_run.model, 128),
      np.round(sizes * scales[:, None]), pre_nms_top_k=ec.pre_nms_top_k,
      score_threshold=0.0, iou_threshold=ec.iou_threshold, max_detections=20)
  np.testing.assert_array_equal(ref['num_detections'], det['num_detections'])
  np.testing.assert_allclose(det['scores'], ref['scores'], atol=1e-5)
  np.testing.assert_allclose(
      det['boxes'], np.minimum(np.asarray(ref['boxes']) / scales[:, None, None],
                               np.tile(sizes[:, None], (1, 1, 2))),
      atol=0.05)
  # A batch array gives the same result as the list for one size.
  one = det_run.detect(np.stack([images[0]] * 2), score_threshold=0.0,
                       max_detections=20)
  np.testing.assert_allclose(one['boxes'][0], det['boxes'][0], atol=1e-3)
  with pytest.raises(ValueError, match='classify'):
    det_run.classify(images)


def test_classify(cls_workdir):
  workdir, state = cls_workdir
  run = spinenet_jax.load_checkpoint(workdir)
  assert run.step == 3
  assert isinstance(run.model, spinenet_jax.Classifier)
  assert run.ema_params is None
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(run.variables['params']),
               jax.device_get(state.params))
  out = run.classify(_images(), k=2)
  assert out['classes'].shape == out['probabilities'].shape == (2, 2)
  assert np.all(out['probabilities'][:, 0] >= out['probabilities'][:, 1])
  assert all(lab in ('circle', 'square', 'triangle')
             for row in out['labels'] for lab in row)
  top = run.classify(_images(), k=10)  # k is capped at the class count.
  np.testing.assert_allclose(top['probabilities'].sum(-1), 1.0, rtol=1e-5)
  feats = run.features(_images())
  assert sorted(feats) == [3, 4, 5, 6, 7]
  with pytest.raises(ValueError, match='detect'):
    run.detect(_images())


def test_predict_writes_png_and_json(det_workdir, det_run, tmp_path):
  paths = []
  for i, im in enumerate(_images()):
    paths.append(str(tmp_path / f'in{i}.jpg'))
    Image.fromarray(im).save(paths[-1])
  out = tmp_path / 'out'
  records = predict.predict(det_run, paths, str(out), score_threshold=0.0)
  assert len(records) == 2
  for i, im in enumerate(_images()):
    with Image.open(out / f'in{i}.png') as png:
      assert png.size == (im.shape[1], im.shape[0])
    rec = json.loads((out / f'in{i}.json').read_text())
    assert rec['height'] == im.shape[0] and rec['detections']
    d = rec['detections'][0]
    assert set(d) == {'box', 'score', 'class', 'label'}
    assert d['label'] in ('circle', 'square', 'triangle')
  assert len(json.loads((out / 'detections.json').read_text())) == 2
  # The command line.
  predict.main([f'--workdir={det_workdir}', f'--image={paths[0]}',
                f'--output={tmp_path / "cli"}'])
  assert (tmp_path / 'cli' / 'in0.png').exists()
  assert (tmp_path / 'cli' / 'in0.json').exists()


def test_draw_spinenet49(tmp_path):
  g = draw.graph('49')
  assert len(g.blocks) == 18
  assert sorted(b.level for b in g.blocks if b.is_output) == [3, 4, 5, 6, 7]
  assert not g.blocks[-1].built  # The dead level-2 block.
  assert any(b.extras for b in g.blocks)  # A merged unused block.
  draw.main(['--model=49', f'--output={tmp_path / "sn49.png"}'])
  with Image.open(tmp_path / 'sn49.png') as im:
    assert im.size[0] > 500 and im.size[1] > 200
  draw.main(['--model=49_mobile', f'--output={tmp_path / "m.svg"}'])
  assert (tmp_path / 'm.svg').read_text().startswith('<svg')


def test_draw_custom_permutation(tmp_path):
  cfg = tmp_path / 'custom.py'
  cfg.write_text('''
import ml_collections
def get_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(model_id='49', block_specs=[
      (3, 'bottleneck', (0, 1), False),
      (4, 'residual', (0, 2), False),
      (5, 'bottleneck', (2, 3), False),
      (3, 'bottleneck', (2, 4), True),
      (4, 'bottleneck', (3, 5), True),
      (5, 'bottleneck', (4, 6), True),
      (6, 'residual', (6, 7), True),
      (7, 'residual', (7, 8), True),
  ]))
  return c
''')
  out = tmp_path / 'custom.png'
  draw.main([f'--config={cfg}', f'--output={out}'])
  with Image.open(out) as im:
    assert im.size[0] > 300
  g = draw.graph_from_config(draw.load_config(str(cfg)))
  assert len(g.blocks) == 10 and 'custom' in g.title
  with pytest.raises(ValueError, match='Block 1'):
    draw.graph('49', [(3, 'bottleneck', (0, 1), False),
                      (4, 'bottleneck', (0, 5), True)])
