"""Runs a trained detector on image files; writes annotated PNGs and JSON.

```sh
python -m spinenet_jax.predict --workdir=runs/demo --image=a.jpg --image=b.png --output=out/
```

For each input `NAME.ext` it writes `OUT/NAME.png` (the image with its
detections drawn: box, class name and score) and `OUT/NAME.json`
(`{"image", "height", "width", "step", "detections": [{"box": [ymin, xmin,
ymax, xmax], "score", "class", "label"}]}` in the image's pixels), plus
`OUT/detections.json` with all images. A classification run writes the
top-k classes instead (`classifications`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import flags
import numpy as np
from PIL import Image

from spinenet_jax import cli
from spinenet_jax import inference
from spinenet_jax.draw import draw_detections


def read_image(path: str) -> np.ndarray:
  """The image file at `path` as uint8 RGB `[H, W, 3]`."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def _unique_names(paths: Sequence[str]) -> list[str]:
  names, seen = [], {}
  for p in paths:
    base = os.path.splitext(os.path.basename(p))[0] or 'image'
    n = seen.get(base, 0)
    seen[base] = n + 1
    names.append(base if n == 0 else f'{base}_{n}')
  return names


def predict(run: inference.Run, paths: Sequence[str], output: str,
            score_threshold: float | None = None, batch_size: int = 8,
            k: int = 5, min_score: float = 0.3) -> list[dict[str, Any]]:
  """Writes `output/NAME.png` and `NAME.json` per image; returns the records.

  The JSON keeps every detection above `score_threshold`; the picture shows
  only those scoring at least `min_score`.
  """
  os.makedirs(output, exist_ok=True)
  records = []
  names = _unique_names(paths)
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    images = [read_image(p) for p in chunk]
    if run.is_detection:
      det = run.detect(images, score_threshold=score_threshold)
    else:
      cls = run.classify(images, k=k)
    for i, (path, image) in enumerate(zip(chunk, images)):
      name = names[start + i]
      rec = {'image': os.path.abspath(path), 'height': int(image.shape[0]),
             'width': int(image.shape[1]), 'step': int(run.step)}
      if run.is_detection:
        n = int(det['num_detections'][i])
        rec['detections'] = [
            {'box': [round(float(v), 2) for v in det['boxes'][i, j]],
             'score': round(float(det['scores'][i, j]), 4),
             'class': int(det['classes'][i, j]),
             'label': inference.class_name(run.labels, det['classes'][i, j])}
            for j in range(n)]
        picture = draw_detections(image, [d for d in rec['detections']
                                          if d['score'] >= min_score])
      else:
        rec['classifications'] = [
            {'class': int(c), 'label': lab, 'probability': round(float(p), 4)}
            for c, lab, p in zip(cls['classes'][i], cls['labels'][i],
                                 cls['probabilities'][i])]
        picture = draw_detections(image, [], caption=', '.join(
            f'{c["label"]} {c["probability"]:.2f}'
            for c in rec['classifications'][:3]))
      picture.save(os.path.join(output, name + '.png'))
      rec['output'] = os.path.join(os.path.abspath(output), name + '.png')
      with open(os.path.join(output, name + '.json'), 'w') as f:
        json.dump(rec, f, indent=1)
      records.append(rec)
  with open(os.path.join(output, 'detections.json'), 'w') as f:
    json.dump(records, f, indent=1)
  return records


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the command-line flags on `fv`."""
  flags.DEFINE_string(
      'workdir', None,
      'Training run directory (or WORKDIR/checkpoints/STEP).', flag_values=fv)
  flags.DEFINE_multi_string('image', None, 'An image file; repeat for more.',
                            flag_values=fv)
  flags.DEFINE_string('output', None, 'Output directory.', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).',
                       flag_values=fv)
  flags.DEFINE_float('score_threshold', None,
                     "Default: the run's config.eval.score_threshold.",
                     flag_values=fv)
  flags.DEFINE_float('min_score', 0.3,
                     'Detections drawn: those scoring at least this (the '
                     'JSON keeps all of them).', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.',
                       flag_values=fv)
  for name in ('workdir', 'image', 'output'):
    flags.mark_flag_as_required(name, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs --workdir's model on --image files; `argv` excludes the program."""
  fv = cli.parse_flags('predict', __doc__, define_flags, argv)
  if isinstance(fv, int):
    return fv
  run = inference.load_checkpoint(fv.workdir, step=fv.step)
  records = predict(run, fv.image, fv.output, fv.score_threshold,
                    fv.batch_size, min_score=fv.min_score)
  for rec in records:
    n = len(rec.get('detections', rec.get('classifications', [])))
    what = 'detections' if run.is_detection else 'classes'
    print(f'{rec["image"]}: {n} {what} -> {rec["output"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
