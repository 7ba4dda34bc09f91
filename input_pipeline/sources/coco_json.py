"""COCO-format detection: an annotations JSON plus a folder of images.

`config.data.train_annotations` / `eval_annotations`: the JSON files
(`images`, `annotations` with `bbox` [x, y, width, height] in pixels,
`categories`); `train_images` / `eval_images`: the folders that the images'
`file_name`s are relative to. Category ids and names come from the file;
image ids are kept, so results are written in the user's ids.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from input_pipeline.sources import checks
from input_pipeline.sources import records

Record = records.Record


def load(path: str) -> dict:
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or 'images' not in data or (
      'categories' not in data):
    raise ValueError(f'{path} is not a COCO annotations file: it needs '
                     f'"images", "annotations" and "categories".')
  return data


def categories(path: str) -> dict[int, str]:
  """Category id -> name of one annotations file."""
  return {int(c['id']): str(c.get('name', c['id']))
          for c in load(path)['categories']}


def read(annotations: str, images: str, split: str, report: checks.Report
         ) -> Iterator[Record]:
  """The records of one annotations file, in its `images` order."""
  data = load(annotations)
  by_image: dict[int, list[dict]] = {}
  image_ids = {int(im['id']) for im in data['images']}
  for ann in data.get('annotations', []):
    image_id = int(ann.get('image_id', -1))
    if image_id not in image_ids:
      report.add(split, 'box_unknown_image', ann.get('id', '?'))
      continue
    by_image.setdefault(image_id, []).append(ann)
  seen = set()
  for im in data['images']:
    image_id = int(im['id'])
    name = str(im.get('file_name', ''))
    if image_id in seen:
      report.add(split, 'image_duplicate_id', image_id)
      continue
    seen.add(image_id)
    anns = by_image.get(image_id, [])
    boxes = []
    for a in anns:
      b = a.get('bbox') or [float('nan')] * 4
      boxes.append([b[0], b[1], b[0] + b[2], b[1] + b[3]] if len(b) == 4
                   else [float('nan')] * 4)
    yield Record(
        image_id=image_id, name=name,
        read=records.file_reader(os.path.join(images, name)), boxes=boxes,
        categories=[int(a.get('category_id', -1)) for a in anns],
        is_crowd=[bool(a.get('iscrowd', 0)) for a in anns])
