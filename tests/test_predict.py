"""The predict module and CLI on the session's demo detection run."""

import json
from pathlib import Path
import shutil

import numpy as np
from PIL import Image

from spinenet_jax import inference
from spinenet_jax import predict


def test_predict_writes_png_and_json(det_workdir, det_run, tmp_path,
                                     sample_images):
  paths = []
  for i, im in enumerate(sample_images):
    paths.append(str(tmp_path / f'in{i}.jpg'))
    Image.fromarray(im).save(paths[-1])
  out = tmp_path / 'out'
  records = predict.predict(det_run, paths, str(out), score_threshold=0.0)
  assert len(records) == 2
  for i, im in enumerate(sample_images):
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


def test_min_score_thins_the_picture_not_the_json(det_run, tmp_path,
                                                  sample_images):
  path = str(tmp_path / 'in.jpg')
  Image.fromarray(sample_images[0]).save(path)
  everything = predict.predict(det_run, [path], str(tmp_path / 'all'),
                               score_threshold=0.0, min_score=0.0)
  nothing = predict.predict(det_run, [path], str(tmp_path / 'none'),
                            score_threshold=0.0, min_score=1.01)
  assert everything[0]['detections'] == nothing[0]['detections']
  assert everything[0]['detections']
  with Image.open(tmp_path / 'none' / 'in.png') as png, Image.open(
      tmp_path / 'all' / 'in.png') as full:
    bare = predict.draw_detections(predict.read_image(path), [])
    assert np.array_equal(np.asarray(png), np.asarray(bare))
    assert not np.array_equal(np.asarray(full), np.asarray(bare))


def test_class_names_come_from_the_run(det_workdir, tmp_path, sample_images):
  """`label_map.json` is written by training and used by predict."""
  names = json.loads((Path(det_workdir) / 'label_map.json').read_text())
  assert names == {'1': 'circle', '2': 'square', '3': 'triangle'}
  run_dir = tmp_path / 'run'
  shutil.copytree(det_workdir, run_dir)
  (run_dir / 'label_map.json').write_text(json.dumps(
      {'1': 'apple', '2': 'pear', '3': 'plum'}))
  run = inference.load_checkpoint(str(run_dir))
  path = str(tmp_path / 'in.jpg')
  Image.fromarray(sample_images[0]).save(path)
  rec = predict.predict(run, [path], str(tmp_path / 'out'),
                        score_threshold=0.0)[0]
  assert {d['label'] for d in rec['detections']} <= {'apple', 'pear', 'plum'}
