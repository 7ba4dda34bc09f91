"""The predict module and CLI on the session's demo detection run."""

import json

from PIL import Image

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
