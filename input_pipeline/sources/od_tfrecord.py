"""Model Garden / TF Object Detection TFRecords, read as they are.

`config.data.train_annotations` / `eval_annotations`: file patterns of
TFRecord files of `tf.train.Example`s with the keys Model Garden's
`TfExampleDecoder` reads (`official/vision/dataloaders/tf_example_decoder.py`):
`image/encoded`, `image/source_id`, `image/object/bbox/{ymin,xmin,ymax,xmax}`
(normalised), `image/object/class/label`, optionally
`image/object/class/text` and `image/object/is_crowd`. Class names come from
`config.data.label_map` (a JSON {id: name} or a TF OD `.pbtxt` label map)
when set, else from `class/text`, else "class <id>". Images are used as
TensorFlow decodes them (EXIF orientation ignored, as Model Garden's
decoder does), so the boxes stay where they were drawn. Image ids are the
numeric `source_id`s (else positions from 1).
"""
from __future__ import annotations

import glob
import json
import re
from typing import Iterator

import tensorflow as tf

from input_pipeline.sources import checks
from input_pipeline.sources import records

Record = records.Record


def files(pattern: str, field: str) -> list[str]:
  found = sorted(f for p in pattern.split(',') for f in glob.glob(p.strip()))
  if not found:
    raise FileNotFoundError(f'config.data.{field}={pattern!r} matches no '
                            'TFRecord files.')
  return found


def read_label_map(path: str) -> dict[int, str]:
  """A JSON {id: name} or TF OD pbtxt (`item { id: 1 name: 'cat' }`)."""
  with open(path) as f:
    text = f.read()
  if path.endswith('.json'):
    return {int(k): str(v) for k, v in json.loads(text).items()}
  out = {}
  for item in re.findall(r'item\s*\{(.*?)\}', text, re.S):
    i = re.search(r'\bid\s*:\s*(\d+)', item)
    n = (re.search(r'display_name\s*:\s*["\'](.*?)["\']', item) or
         re.search(r'\bname\s*:\s*["\'](.*?)["\']', item))
    if i:
      out[int(i.group(1))] = n.group(1) if n else f'class {i.group(1)}'
  if not out:
    raise ValueError(f'No `item {{ id: ... name: ... }}` in label map {path}.')
  return out


def _examples(paths: list[str]) -> Iterator[tf.train.Example]:
  for raw in tf.data.TFRecordDataset(paths).as_numpy_iterator():
    yield tf.train.Example.FromString(raw)


def _values(ex: tf.train.Example, key: str) -> list:
  f = ex.features.feature.get(key)
  if f is None:
    return []
  kind = f.WhichOneof('kind')
  return list(getattr(f, kind).value) if kind else []


def categories(paths: list[str]) -> dict[int, str]:
  """Category id -> name from the records' `class/label` and `class/text`."""
  out = {}
  for ex in _examples(paths):
    texts = _values(ex, 'image/object/class/text')
    for i, label in enumerate(_values(ex, 'image/object/class/label')):
      if int(label) not in out or out[int(label)].startswith('class '):
        out[int(label)] = (texts[i].decode() if i < len(texts)
                           else f'class {int(label)}')
  return out


def read(paths: list[str], split: str, report: checks.Report
         ) -> Iterator[Record]:
  """The records of the files, in order."""
  seen = set()
  for index, ex in enumerate(_examples(paths)):
    source = (_values(ex, 'image/source_id') or [b''])[0].decode()
    image_id = int(source) if source.isdigit() else index + 1
    if image_id in seen:
      report.add(split, 'image_duplicate_id', image_id)
      continue
    seen.add(image_id)
    encoded = (_values(ex, 'image/encoded') or [None])[0]
    ymin, xmin, ymax, xmax = (_values(ex, f'image/object/bbox/{k}')
                              for k in ('ymin', 'xmin', 'ymax', 'xmax'))
    labels = [int(v) for v in _values(ex, 'image/object/class/label')]
    crowd = _values(ex, 'image/object/is_crowd')
    n = len(labels)
    if not len(ymin) == len(xmin) == len(ymax) == len(xmax) == n:
      report.add(split, 'annotation_unreadable', image_id)
      continue
    yield Record(
        image_id=image_id, name=source or str(image_id),
        read=lambda e=encoded: e or None,
        # Normalised here; `prepare` scales by the decoded size.
        boxes=[[xmin[i], ymin[i], xmax[i], ymax[i]] for i in range(n)],
        categories=labels,
        is_crowd=[bool(crowd[i]) if i < len(crowd) else False
                  for i in range(n)],
        apply_exif=False)
