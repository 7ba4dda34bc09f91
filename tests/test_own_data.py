"""The user's own data: preparation of every format with every bad case,
training on it, config errors, and two processes reading it."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import tiny
import user_data
from configs import common
from input_pipeline import sources
from input_pipeline.sources import prepare
from spinenet_jax import config_checks
from test_train import free_port

REPO = tiny.REPO


def _data_cfg(name: str, paths: dict, data_dir) -> object:
  cfg = common.data_config(name)
  for k, v in paths.items():
    cfg[k] = v
  cfg.data_dir = str(data_dir)
  return cfg


def _problems(meta: dict, split: str) -> dict[str, int]:
  return {k: p['count'] for k, p in meta['report'][split]['problems'].items()}


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  """A prepared COCO-JSON dataset: (data config, source paths)."""
  root = tmp_path_factory.mktemp('coco_src')
  paths = user_data.write_coco(str(root))
  cfg = _data_cfg('coco_json', paths, tmp_path_factory.mktemp('coco_tfds'))
  logs = []
  prepare.prepare(cfg, log=logs.append)
  assert any('Preparing' in line for line in logs)
  return cfg, paths


def test_coco_json_report_counts_every_case(coco):
  cfg, paths = coco
  meta = sources.dataset_meta(cfg)
  assert _problems(meta, 'train') == user_data.COCO_TRAIN_COUNTS
  assert meta['report']['train']['totals'] == {
      'records': 14, 'images': 12, 'boxes': meta['report']['train'][
          'totals']['boxes']}
  assert meta['classes'] == {1: 'circle', 2: 'square', 3: 'triangle'}
  assert meta['category_ids'] == {1: 7, 2: 42, 3: 1000}
  assert meta['eval_annotations'] == paths['eval_annotations']
  report = json.load(open(os.path.join(meta['data_dir'],
                                       sources.REPORT_FILE)))
  assert report['train']['problems']['image_cmyk']['examples'] == ['9004']
  logs = []  # Idempotent: a second run only reports.
  prepare.prepare(cfg, log=logs.append)
  assert logs[0].startswith('Already prepared')
  assert any('image_cmyk' in line for line in logs)


def test_coco_json_records_kept_exactly(coco):
  """Good JPEGs stored byte for byte; the repaired ones decode to RGB; the
  EXIF-rotated image is stored upright with its boxes as annotated."""
  cfg, paths = coco
  builder = prepare.prepared_builder(cfg)
  ds = builder.as_dataset(split='train', decoders={
      'image': __import__('tensorflow_datasets').decode.SkipDecoding()})
  examples = {int(ex['image/id']): ex for ex in ds.as_numpy_iterator()}
  ann = json.load(open(paths['train_annotations']))
  names = {im['id']: im['file_name'] for im in ann['images']}
  assert 9001 in examples and 8000 in examples  # Duplicate: first kept.
  assert 9012 not in examples and 9013 not in examples  # Broken, missing.
  raw = open(os.path.join(paths['train_images'], names[9008]), 'rb').read()
  assert examples[9008]['image'] == raw
  for image_id in (9001, 9002, 9003, 9004, 9005, 9006):
    im = Image.open(io.BytesIO(examples[image_id]['image']))
    assert im.mode == 'RGB', image_id
  upright = Image.open(io.BytesIO(examples[9006]['image']))
  entry = next(im for im in ann['images'] if im['id'] == 9006)
  assert upright.size == (entry['width'], entry['height'])
  boxes = [a['bbox'] for a in ann['annotations'] if a['image_id'] == 9006]
  got = examples[9006]['objects']['bbox']
  want = np.float32([[y / entry['height'], x / entry['width'],
                      (y + h) / entry['height'], (x + w) / entry['width']]
                     for x, y, w, h in boxes])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert len(examples[8000]['objects']['bbox']) == 0  # A negative.


def test_voc(tmp_path):
  paths = user_data.write_voc(str(tmp_path / 'src'))
  cfg = _data_cfg('voc_xml', paths, tmp_path / 'tfds')
  prepare.prepare(cfg, log=lambda _: None)
  meta = sources.dataset_meta(cfg)
  assert meta['classes'] == {1: 'circle', 2: 'square', 3: 'triangle'}
  assert _problems(meta, 'train') == {
      'annotation_unreadable': 1, 'image_missing': 1, 'box_clipped': 1}
  gt = json.load(open(meta['eval_annotations']))
  assert len(gt['images']) == 3
  assert {c['id'] for c in gt['categories']} == {1, 2, 3}
  ds = prepare.prepared_builder(cfg).as_dataset(split='train')
  crowd = [ex['objects']['is_crowd'] for ex in ds.as_numpy_iterator()]
  assert sum(int(c.sum()) for c in crowd) == 1  # The difficult object.


def test_tfrecord(tmp_path):
  paths = user_data.write_tfrecord(str(tmp_path / 'src'))
  cfg = _data_cfg('od_tfrecord', paths, tmp_path / 'tfds')
  prepare.prepare(cfg, log=lambda _: None)
  meta = sources.dataset_meta(cfg)
  assert meta['classes'] == {1: 'circle', 2: 'square', 3: 'triangle'}
  assert meta['category_ids'] == {1: 7, 2: 42, 3: 1000}
  assert _problems(meta, 'train') == {'image_unreadable': 1,
                                      'box_nonfinite': 1}
  gt = json.load(open(meta['eval_annotations']))
  assert sorted(im['id'] for im in gt['images']) == [500, 501, 503]
  assert {a['category_id'] for a in gt['annotations']} <= {7, 42, 1000}


def test_image_folder(tmp_path):
  paths = user_data.write_folders(str(tmp_path / 'src'))
  cfg = _data_cfg('image_folder', paths, tmp_path / 'tfds')
  prepare.prepare(cfg, log=lambda _: None)
  meta = sources.dataset_meta(cfg)
  assert sorted(meta['classes'].values()) == sorted(
      os.listdir(paths['train_images']))
  assert min(meta['classes']) == 0  # Classification: class id = label.
  assert _problems(meta, 'train') == {'image_grayscale': 1,
                                      'image_unreadable': 1}
  assert meta['eval_annotations'] is None
  assert sources.num_classes(cfg, detection=False) == len(meta['classes'])


def test_config_errors(coco, tmp_path):
  cfg, _ = coco
  config = tiny.load_config('demo', {**tiny.TINY_DEMO, 'data.name':
                                     'coco_json', 'model.num_classes': 91})
  config.data = cfg
  with pytest.raises(config_checks.ConfigError,
                     match=r'3 classes, \+ 1 for background = 4.*'
                     r'num_classes=4'):
    config_checks.validate(config, num_devices=8)
  config.model.num_classes = None
  assert sources.resolve_num_classes(config).model.num_classes == 4
  missing = _data_cfg('coco_json', {'train_annotations': str(tmp_path / 'x'),
                                    'train_images': str(tmp_path)}, tmp_path)
  with pytest.raises(FileNotFoundError, match='train_annotations'):
    prepare.prepare(missing)
  with pytest.raises(ValueError, match='config.data.train_images'):
    prepare.prepare(_data_cfg('image_folder', {}, tmp_path))


def test_prepared_data_trains(coco, tmp_path):
  cfg, _ = coco
  config = tiny.load_config('demo', {
      **tiny.TINY_DEMO, 'data.name': 'coco_json', 'total_steps': 2,
      'optimizer.warmup_steps': 1, 'checkpoint_every_steps': 0,
      'batch_size': 8, 'eval.score_threshold': 0.0})
  for k in ('train_annotations', 'train_images', 'eval_annotations',
            'eval_images', 'data_dir'):
    config.data[k] = cfg[k]
  result, stdout = tiny.run_in_process(config, tmp_path / 'run')
  assert result['step'] == 2 and 'AP' in result, stdout
  run = tmp_path / 'run'
  assert json.loads((run / 'label_map.json').read_text()) == {
      '1': 'circle', '2': 'square', '3': 'triangle'}
  rows = json.loads((run / 'detections_2.json').read_text())
  assert rows
  assert {r['category_id'] for r in rows} <= {7, 42, 1000}
  eval_ids = {im['id'] for im in json.load(open(cfg.eval_annotations))[
      'images']}
  assert {r['image_id'] for r in rows} <= eval_ids
  from pycocotools import coco as coco_lib  # pylint: disable=g-import-not-at-top
  coco_lib.COCO(cfg.eval_annotations).loadRes(str(run / 'detections_2.json'))
  assert {'AP/circle', 'AP/square', 'AP/triangle'} <= set(result), result
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = [e for f in (run / 'tb').iterdir()
            for e in tf.compat.v1.train.summary_iterator(str(f))]
  images = [v for e in events for v in e.summary.value
            if v.tag == 'eval/truth_vs_predicted']
  assert images and len(images[0].tensor.string_val) == 2 + 4  # w, h, 4 PNGs


READER = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from input_pipeline import detection
import ml_collections
cfg = ml_collections.ConfigDict(json.loads(sys.argv[3]))
ev = [int(i) for b in detection.eval_iterator(cfg, batch_size=2)
      for i, m in zip(b['image_id'], b['mask']) if m]
tr = [int(i) for _, b in zip(range(3), detection.train_iterator(
      cfg, batch_size=4, seed=0, with_ids=True)) for i in b['image_id']]
print('IDS', json.dumps({'eval': ev, 'train': tr}), flush=True)
"""


def test_two_processes_read_disjoint_halves(coco):
  """Two `jax.distributed` processes: disjoint eval halves that cover the
  split; training batches from disjoint halves of the training split."""
  cfg, _ = coco
  address = f'127.0.0.1:{free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  data = json.dumps({**cfg.to_dict(), 'image_size': 128, 'max_instances': 16})
  procs = [subprocess.Popen([sys.executable, '-c', READER, address, str(i),
                             data], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  ids = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    ids.append(json.loads(out.split('IDS ', 1)[1].splitlines()[0]))
  builder = prepare.prepared_builder(cfg)
  want = sorted(int(ex['image/id']) for ex in builder.as_dataset(
      split='validation').as_numpy_iterator())
  assert not set(ids[0]['eval']) & set(ids[1]['eval'])
  assert sorted(ids[0]['eval'] + ids[1]['eval']) == want
  assert not set(ids[0]['train']) & set(ids[1]['train'])
  train = {int(ex['image/id']) for ex in builder.as_dataset(
      split='train').as_numpy_iterator()}
  assert set(ids[0]['train'] + ids[1]['train']) == train  # 6 + 6 in 3 steps.
