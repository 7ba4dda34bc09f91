"""Export for serving (`spinenet_jax.export`): every format against JAX.

The demo checkpoint is the shared tiny detection run (`det_run`), the
classifier the shared classification run; Mobile-49 is the tiny Mobile
permutation, initialised (its conversion is what is tested, not its
accuracy). Each export already checks itself against the JAX model; the
tests re-run the written files independently (a fresh process, TF,
ai-edge-litert, onnxruntime) and compare again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from spinenet_jax import export
from spinenet_jax import export_loader
from spinenet_jax import export_report
from spinenet_jax import inference
from spinenet_jax import models

# Every (anchor, class) pair above 0 enters NMS: the tiny run's scores are
# low, and a full 100 detections per image is the case worth comparing.
THRESHOLD = 0.0


def _detect_in_jax(run, images):
  """`Run.detect` on images already at the input size (scale 1)."""
  return run.detect(list(images), score_threshold=THRESHOLD)


def _assert_same_detections(got, want):
  assert want['num_detections'].min() > 0
  diffs = export_report.compare('detector', got, want)
  assert diffs['counts_equal'] and diffs['unmatched'] == 0, diffs


@pytest.fixture(scope='module')
def mobile_run():
  overrides = {**tiny.TINY_DATA, **tiny.TINY_HEAD,
               'model.filter_size_scale': 0.125,
               'model.endpoints_num_filters': 16,
               'model.block_specs': tiny.TINY_MOBILE_SPECS}
  config = tiny.load_config('spinenet49_mobile_coco', overrides)
  model = models.build_model(config)
  v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1, 128, 128, 3)))
  return inference.Run(model=model, variables={
      'params': v['params'], 'batch_stats': v['batch_stats']},
                       config=config, step=0)


@pytest.fixture(scope='module')
def cls_run(cls_reference):
  return inference.load_checkpoint(cls_reference.workdir)


# ------------------------------------------------------------ bad requests


@pytest.mark.parametrize('kwargs, match', [
    (dict(fmt='onnx', what='detector'), 'NMS.*--what=raw'),
    (dict(fmt='jax', image_size=200), r'200 is not a multiple of 128.*256'),
    (dict(fmt='jax', quantize='int8'), 'for --format=tflite only'),
    (dict(fmt='tflite', quantize='int8', what='detector'), 'int8 cannot take'),
    (dict(fmt='jax', what='classifier'), 'needs a classification run'),
    (dict(fmt='pb'), 'not one of'),
    (dict(fmt='jax', batch='two'), "neither a positive integer nor 'dynamic'"),
    (dict(fmt='tflite', dtype='bfloat16'), 'float32 graphs only'),
])
def test_bad_requests_say_what_works(det_run, kwargs, match):
  with pytest.raises(export.ExportError, match=match):
    export.check_request(det_run, **kwargs)


def test_missing_run_is_one_line_and_exit_1(tmp_path, capsys):
  assert export.main([f'--workdir={tmp_path / "nope"}',
                      f'--output={tmp_path / "out"}']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('export: error:') and len(err.splitlines()) == 1
  assert 'nope' in err


# ----------------------------------------------------------------- formats


def test_jax_export_runs_in_a_process_without_flax(det_run, tmp_path):
  out = tmp_path / 'jax'
  info = export.export_run(det_run, 'jax', str(out), batch='dynamic',
                           score_threshold=THRESHOLD, log=lambda _: None)
  assert info['input']['shape'] == [None, 128, 128, 3]
  assert info['platforms'] == ['cpu', 'cuda']
  assert info['max_difference_to_jax']['counts_equal'] == 1.0
  images = export_report.check_images(det_run, export.check_request(
      det_run, 'jax'))[:3]
  np.save(tmp_path / 'images.npy', images)
  script = textwrap.dedent(f'''
      import json, sys
      import numpy as np
      sys.path.insert(0, {str(out)!r})
      import loader
      model = loader.load({str(out)!r})
      out = model(np.load({str(tmp_path / "images.npy")!r}))
      np.savez({str(tmp_path / "got.npz")!r}, **out)
      banned = [m for m in ('flax', 'spinenet_jax', 'tensorflow')
                if m in sys.modules]
      print(json.dumps(banned))
  ''')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
  got = dict(np.load(tmp_path / 'got.npz'))
  _assert_same_detections(got, _detect_in_jax(det_run, images))
  # The sha256 in the manifest is checked at load time.
  with open(out / 'model.jax_export', 'ab') as f:
    f.write(b'x')
  sys.path.insert(0, str(out))
  try:
    from spinenet_jax import export_loader  # pylint: disable=g-import-not-at-top
    with pytest.raises(ValueError, match='sha256'):
      export_loader.load(str(out))
  finally:
    sys.path.remove(str(out))


def test_savedmodel_detector_runs_in_tf(det_run, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info = export.export_run(det_run, 'savedmodel', str(tmp_path), batch=2,
                           score_threshold=THRESHOLD, log=lambda _: None)
  assert info['signatures'] == ['serving_default', 'serving_jpeg']
  images = export_report.check_images(det_run, export.check_request(
      det_run, 'savedmodel'))[:2]
  loaded = tf.saved_model.load(str(tmp_path / 'saved_model'))
  got = {k: v.numpy() for k, v in loaded.signatures['serving_default'](
      images=tf.constant(images)).items()}
  _assert_same_detections(got, _detect_in_jax(det_run, images))
  # JPEG bytes of any size: boxes come back in each image's own pixels.
  big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
  jpegs = tf.stack([tf.io.encode_jpeg(im, quality=95) for im in big])
  det = loaded.signatures['serving_jpeg'](jpegs=jpegs)
  np.testing.assert_allclose(det['scales'].numpy(), [0.5, 0.5])
  n = det['num_detections'].numpy()
  assert n.min() > 0
  assert det['boxes'].numpy()[0, :n[0]].max() > 128  # In 256 px pixels.


def test_mobile_and_classifier_in_jax_and_savedmodel(mobile_run, cls_run,
                                                    tmp_path):
  """The graphs the detector tests above do not cover, read back from disk
  (`export_run` checks what it wrote against the JAX model)."""
  for fmt in ('jax', 'savedmodel'):
    for name, run, what in (('mobile', mobile_run, 'raw'),
                            ('cls', cls_run, 'classifier')):
      info = export.export_run(run, fmt, str(tmp_path / fmt / name),
                               what=what, log=lambda _: None)
      assert max(info['max_difference_to_jax'].values()
                 ) <= export_report.RAW_RTOL, (fmt, name)


def test_tflite_detector_and_raw_are_builtin_and_match(det_run, tmp_path):
  from spinenet_jax import export_tf  # pylint: disable=g-import-not-at-top
  det = export.export_run(det_run, 'tflite', str(tmp_path / 'det'),
                          score_threshold=THRESHOLD, log=lambda _: None)
  assert 'TOPK_V2' in det['tflite_ops'] and 'WHILE' in det['tflite_ops']
  raw = export.export_run(det_run, 'tflite', str(tmp_path / 'raw'),
                          what='raw', log=lambda _: None)
  assert 'RSQRT' not in raw['tflite_ops']  # Batch norm folded.
  request = export.check_request(det_run, 'tflite', 'raw')
  images = export_report.check_images(det_run, request)[:1]
  runner, _ = export_tf.tflite_runner(str(tmp_path / 'raw' / 'model.tflite'))
  got = runner(images)
  want = jax.jit(export.serving_function(det_run, request))(
      jax.device_get(det_run.variables), images)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=0,
                               atol=1e-4 * float(np.abs(v).max()))


def test_tflite_mobile_float_and_dynamic_range(mobile_run, tmp_path):
  fl = export.export_run(mobile_run, 'tflite', str(tmp_path / 'f'),
                         what='raw', log=lambda _: None)
  assert {'DEPTHWISE_CONV_2D', 'HARD_SWISH'} <= set(fl['tflite_ops'])
  assert 'RSQRT' not in fl['tflite_ops']
  assert max(fl['max_difference_to_jax'].values()) <= export_report.RAW_RTOL
  q = export.export_run(mobile_run, 'tflite', str(tmp_path / 'q'),
                        what='raw', quantize='dynamic', log=lambda _: None)
  assert q['size_bytes'] < fl['size_bytes']  # Only large kernels shrink.
  assert q['quantize'] == 'dynamic'


def test_classifier_tflite_and_manifest(cls_run, tmp_path):
  info = export.export_run(cls_run, 'tflite', str(tmp_path),
                           log=lambda _: None)
  on_disk = json.loads((tmp_path / 'manifest.json').read_text())
  assert on_disk['sha256'] == export_report.sha256_tree(
      str(tmp_path / 'model.tflite')) == info['sha256']
  assert on_disk['what'] == 'classifier'
  assert on_disk['label_map'] == {str(k): v for k, v in cls_run.labels.items()}
  assert set(on_disk['outputs']) == {'logits', 'probabilities'}
  assert on_disk['versions']['jax'] == jax.__version__
  assert max(on_disk['max_difference_to_jax'].values()) <= 1e-4
  assert 'pad_rgb' not in on_disk['preprocessing']  # Cropped, not padded.
  image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), np.uint8)
  loaded = export_loader.Artifact.__new__(export_loader.Artifact)
  loaded.manifest, loaded.image_size = on_disk, cls_run.image_size
  batch, _ = loaded.prepare([image])
  want = inference.denormalize(np.asarray(inference._center_crop_resize(  # pylint: disable=protected-access
      image, cls_run.image_size)))
  assert np.abs(batch[0].astype(int) - want.astype(int)).max() <= 1


def _onnx_available() -> bool:
  from spinenet_jax import export_onnx  # pylint: disable=g-import-not-at-top
  return export_onnx._importable() or os.path.exists(  # pylint: disable=protected-access
      os.environ.get(export_onnx.ONNX_PYTHON_ENV) or
      export_onnx.DEFAULT_PYTHON)


@pytest.mark.skipif(not _onnx_available(),
                    reason='ONNX export needs `make onnx` (its own venv)')
def test_onnx_raw_backbone_mobile_and_classifier_run_in_onnxruntime(
    det_run, mobile_run, cls_run, tmp_path):
  ops = {}
  for name, run, what in (('raw', det_run, 'raw'),
                          ('backbone', det_run, 'backbone'),
                          ('mobile', mobile_run, 'raw'),
                          ('cls', cls_run, 'classifier')):
    info = export.export_run(run, 'onnx', str(tmp_path / name), what=what,
                             batch='dynamic', log=lambda _: None)
    assert info['input']['shape'] == [None, 128, 128, 3], name
    assert max(info['max_difference_to_jax'].values()
               ) <= export_report.RAW_RTOL, name
    ops[name] = info['onnx_ops']
  # One copy of the network, not one per output (five feature maps here):
  # a batch norm node per batch-norm layer of the backbone.
  bn_layers = len(jax.tree.leaves(det_run.variables['batch_stats'][
      'backbone'])) // 2
  assert ops['backbone']['BatchNormalization'] == bn_layers
