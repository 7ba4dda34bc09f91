"""Pascal VOC detection: `Annotations/*.xml`, `JPEGImages/`,
`ImageSets/Main/<set>.txt`.

`config.data.train_annotations` / `eval_annotations`: the image-set files
(e.g. `VOC2012/ImageSets/Main/train.txt`; the dataset root is the folder
two levels above); `train_images` / `eval_images` (optional): the image
folder, default `<root>/JPEGImages`. Class names come from the XML files
(sorted, category id = position + 1). Boxes follow TFDS's `voc` builder
(`tensorflow_datasets/object_detection/voc.py`): VOC's 1-based pixel
corners minus one. `difficult` objects become crowd boxes (ignored by COCO
evaluation, as VOC's evaluation ignores them, and left out of training by
`data.skip_crowd_during_training`). Image ids are positions in the set file
(from 1); the file names are kept beside them.
"""
from __future__ import annotations

import os
from typing import Iterator
import xml.etree.ElementTree as ET

from input_pipeline.sources import checks
from input_pipeline.sources import records

Record = records.Record


def root_of(image_set: str) -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(image_set))))


def image_ids(image_set: str) -> list[str]:
  with open(image_set) as f:
    return [line.split()[0] for line in f if line.strip()]


def _parse(path: str) -> ET.Element | None:
  try:
    return ET.parse(path).getroot()
  except (ET.ParseError, OSError):
    return None


def class_names(image_sets: list[str]) -> list[str]:
  """Sorted object names over the XML files of the image sets."""
  names = set()
  for image_set in image_sets:
    root = root_of(image_set)
    for name in image_ids(image_set):
      xml = _parse(os.path.join(root, 'Annotations', f'{name}.xml'))
      if xml is not None:
        names.update((o.findtext('name') or '').strip()
                     for o in xml.iter('object'))
  names.discard('')
  return sorted(names)


def _box(obj: ET.Element) -> list[float]:
  b = obj.find('bndbox')
  try:
    return [float(b.findtext(k)) - 1 for k in ('xmin', 'ymin', 'xmax', 'ymax')]
  except (AttributeError, TypeError, ValueError):
    return [float('nan')] * 4


def read(image_set: str, images: str | None, names: list[str], split: str,
         report: checks.Report) -> Iterator[Record]:
  """The records of one image-set file, in its order."""
  root = root_of(image_set)
  images = images or os.path.join(root, 'JPEGImages')
  category = {n: i + 1 for i, n in enumerate(names)}
  seen = set()
  for index, name in enumerate(image_ids(image_set)):
    if name in seen:
      report.add(split, 'image_duplicate_id', name)
      continue
    seen.add(name)
    xml = _parse(os.path.join(root, 'Annotations', f'{name}.xml'))
    if xml is None:
      report.add(split, 'annotation_unreadable', name)
      continue
    file_name = (xml.findtext('filename') or f'{name}.jpg').strip()
    objects = list(xml.iter('object'))
    yield Record(
        image_id=index + 1, name=file_name,
        read=records.file_reader(os.path.join(images, file_name)),
        boxes=[_box(o) for o in objects],
        categories=[category.get((o.findtext('name') or '').strip(), -1)
                    for o in objects],
        is_crowd=[(o.findtext('difficult') or '0').strip() == '1'
                  for o in objects])
