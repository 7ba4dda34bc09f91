"""The user's own data: COCO JSON, Pascal VOC, TFRecords, image folders.

Each format is a module here that reads the user's files into the records
that `prepare` checks, repairs and writes once as a TFDS dataset under
`config.data.data_dir`; training then reads that dataset exactly as it reads
a registered one such as `coco/2017` (per-process splits, deterministic
resumable stream). See `prepare.py` for the command.

The prepared dataset's `META_FILE` (TFDS `DatasetInfo.metadata`, written
with the dataset by `prepare`) holds, as `dataset_meta` returns it:

- `classes`: {class id: name}, class id = TFDS label + 1 for detection (0 is
  background) and TFDS label + `data.label_offset` for classification;
- `category_ids`: {class id: the user's own category id} (detection);
- `eval_annotations`: a COCO ground-truth JSON of the eval split in the
  user's image and category ids (the user's own file for `coco_json`, one
  written by `prepare` for the other detection formats), or None;
- `report`: the data check's counts per kind, with example ids, per split.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# config.data.name -> task ('detection' or 'classification').
FORMATS = {'coco_json': 'detection', 'voc_xml': 'detection',
           'od_tfrecord': 'detection', 'image_folder': 'classification'}
META_FILE = 'metadata.json'  # TFDS's file of `DatasetInfo.metadata`.
REPORT_FILE = 'data_report.json'


def is_source(name: str) -> bool:
  """True when `config.data.name` names a user-data format."""
  return name in FORMATS


def read_meta(directory: str) -> dict[str, Any]:
  """The metadata `prepare` wrote in a prepared dataset's directory, with
  integer class ids."""
  with open(os.path.join(directory, META_FILE)) as f:
    meta = json.load(f)
  for key in ('classes', 'category_ids'):
    meta[key] = {int(k): v for k, v in meta.get(key, {}).items()}
  return meta


def dataset_meta(data_cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The prepared dataset's metadata (see the module docstring); None for
  datasets that are not user data (TFDS names, shapes).

  Prepares the data on first use in a single-process run.

  Raises:
    FileNotFoundError: several processes and the data is not prepared yet
      (names the command), or the source's files are missing.
  """
  if not is_source(data_cfg.name):
    return None
  from input_pipeline.sources import prepare  # pylint: disable=g-import-not-at-top
  builder = prepare.get(data_cfg)
  meta = read_meta(builder.data_dir)
  meta.pop('eval_groundtruth', None)  # Large; written as a file instead.
  meta['eval_annotations'] = prepare.eval_annotations(builder)
  meta['data_dir'] = builder.data_dir
  return meta


def num_classes(data_cfg: ml_collections.ConfigDict, detection: bool) -> int:
  """`model.num_classes` the prepared data needs: its largest class id + 1
  (detection: classes + 1 for background; classification: classes +
  `data.label_offset`)."""
  classes = dataset_meta(data_cfg)['classes']
  offset = 0 if detection else data_cfg.get('label_offset', 0)
  return max(classes) + offset + 1 if classes else offset + 1


def resolve_num_classes(config: ml_collections.ConfigDict
                        ) -> ml_collections.ConfigDict:
  """`config` with `model.num_classes` derived from the user's data when it
  is None (a copy); unchanged for other data. A set value is checked
  against the data by `config_checks`."""
  if not is_source(config.data.name) or (
      config.model.get('num_classes') is not None):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.num_classes = num_classes(config.data,
                                         config.task == 'retinanet')
  return config
