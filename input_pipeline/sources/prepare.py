"""Prepares the user's data once as a TFDS dataset, checked and repaired.

  python prepare_data.py --config=configs/finetune.py \
      --config.data.train_annotations=... --config.data.train_images=...

`prepare(data_cfg)` reads the source that `config.data.name` names
(`sources.FORMATS`), runs every record through `checks`, and writes the
dataset `own_data/<format>_<hash>` under `config.data.data_dir` with TFDS
(sharded files, a progress bar; written to a temporary directory and renamed
when complete, so an interrupted run leaves nothing half-written and the
next one starts again). The hash covers the source's paths and the sizes and
times of its annotation files: preparing again is a no-op, and changed
annotations make a new copy. Training reads the copy like any TFDS dataset:
detection in the COCO schema (`image`, `image/id`, `objects/bbox`,
`objects/label`, `objects/is_crowd`), classification with `image` and
`label`. The metadata (`sources.dataset_meta`) and the data check's report
are stored in the dataset's `metadata.json`, and the report also in
`data_report.json` beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import sources
from input_pipeline.sources import checks
from input_pipeline.sources import coco_json
from input_pipeline.sources import image_folder
from input_pipeline.sources import od_tfrecord
from input_pipeline.sources import records
from input_pipeline.sources import voc_xml

# TFDS warns on every builder of a config not in BUILDER_CONFIGS, which is
# how every user dataset is made; it says nothing to act on.
logging.getLogger('absl').addFilter(
    lambda r: 'Using custom data configuration' not in r.getMessage())

COMMAND = 'python prepare_data.py --config=<the training config and overrides>'
EVAL_GT_FILE = 'eval_annotations.json'  # Written for non-COCO detection.


@dataclasses.dataclass(eq=False)
class OwnDataConfig(tfds.core.BuilderConfig):
  """A user-data source: format, (split, annotations, images) per split,
  and its classes as (category id, name) (detection) or names."""
  format: str = 'coco_json'
  splits: tuple[tuple[str, str | None, str | None], ...] = ()
  label_map: str | None = None
  classes: tuple[tuple[int, str], ...] = ()


def _stat(path: str | None) -> str:
  if not path:
    return ''
  if os.path.isdir(path):
    return f'{path}:dir:{os.stat(path).st_mtime_ns}'
  found = od_tfrecord.files(path, 'annotations') if any(
      c in path for c in '*?[,') else [path]
  return ';'.join(f'{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}'
                  for p in found)


def _splits(data_cfg: ml_collections.ConfigDict
            ) -> tuple[tuple[str, str | None, str | None], ...]:
  """(split, annotations, images) of the training and (if set) eval data,
  checked to exist; a clear error naming the config field otherwise."""
  fmt = data_cfg.name
  what = {'coco_json': ('a COCO annotations JSON', 'its image folder'),
          'voc_xml': ('an ImageSets/Main/<set>.txt file',
                      'the JPEGImages folder (optional)'),
          'od_tfrecord': ('a TFRecord file pattern', None),
          'image_folder': (None, 'a folder of <class>/<image> files')}[fmt]
  out = []
  for split, prefix in (('train', 'train'), ('validation', 'eval')):
    ann, images = (data_cfg.get(f'{prefix}_annotations'),
                   data_cfg.get(f'{prefix}_images'))
    if prefix == 'eval' and not ann and not images:
      continue  # No eval data: hold some out with eval_split='train[90%:]'.
    if what[0] is None:
      ann = None
    elif fmt == 'od_tfrecord':
      od_tfrecord.files(ann or '', f'{prefix}_annotations')
    else:
      ann = records.require(ann, f'{prefix}_annotations', what[0])
    if what[1] is None:
      images = None
    elif images or fmt != 'voc_xml':
      images = records.require(images, f'{prefix}_images', what[1])
    out.append((split, ann, images))
  return tuple(out)


def _read_classes(fmt: str, splits, label_map: str | None
                  ) -> tuple[tuple[int, str], ...]:
  if fmt == 'coco_json':
    cats = {}
    for _, ann, _ in splits:
      cats.update(coco_json.categories(ann))
  elif fmt == 'voc_xml':
    cats = dict(enumerate(voc_xml.class_names([a for _, a, _ in splits]), 1))
  elif fmt == 'od_tfrecord':
    cats = (od_tfrecord.read_label_map(label_map) if label_map else
            od_tfrecord.categories([f for _, a, _ in splits
                                    for f in od_tfrecord.files(a, 'x')]))
  else:
    cats = dict(enumerate(image_folder.class_names(
        [i for _, _, i in splits]), 1))
  if not cats:
    raise ValueError(f'No classes found in the {fmt} data {splits}.')
  return tuple(sorted(cats.items()))


def _where(data_cfg: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_cfg.data_dir or
                            tfds.core.constants.DATA_DIR)


def source_config(data_cfg: ml_collections.ConfigDict) -> OwnDataConfig:
  """The builder config of `data_cfg`'s source (reads its classes from a
  prepared copy when there is one, else from the source)."""
  if not sources.is_source(data_cfg.name):
    raise ValueError(f'{data_cfg.name!r} is not a user-data format; expected '
                     f'one of {sorted(sources.FORMATS)}.')
  splits = _splits(data_cfg)
  label_map = data_cfg.get('label_map')
  key = json.dumps([data_cfg.name, [(s, _stat(a), _stat(i))
                                    for s, a, i in splits], _stat(label_map)])
  name = f'{data_cfg.name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}'
  meta_path = os.path.join(_where(data_cfg), 'own_data', name,
                           OwnData.VERSION.__str__(), sources.META_FILE)
  if os.path.exists(meta_path):  # Prepared: the classes it was made with.
    meta = sources.read_meta(os.path.dirname(meta_path))
    classes = tuple(sorted((meta['category_ids'][k], n)
                           for k, n in meta['classes'].items()))
  else:
    classes = _read_classes(data_cfg.name, splits, label_map)
  return OwnDataConfig(name=name, version=str(OwnData.VERSION),
                       format=data_cfg.name, splits=splits,
                       label_map=label_map, classes=classes,
                       description=f'{data_cfg.name} data: {splits}')


def _eval_annotations(split: str, kept: list[dict], cfg: OwnDataConfig
                      ) -> dict[str, Any]:
  return {'images': [k['image'] for k in kept],
          'annotations': [dict(a, id=i + 1) for i, a in enumerate(
              a for k in kept for a in k['annotations'])],
          'categories': [{'id': c, 'name': n} for c, n in cfg.classes],
          'info': {'description': f'{split} split as prepared ({cfg.name})'}}


class OwnData(tfds.core.GeneratorBasedBuilder):
  """The user's own data, checked and stored once (see the module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  @property
  def detection(self) -> bool:
    return sources.FORMATS[self.builder_config.format] == 'detection'

  def _info(self) -> tfds.core.DatasetInfo:
    names = [n for _, n in self.builder_config.classes]
    image = tfds.features.Image(shape=(None, None, 3))
    common = {'image': image, 'image/id': np.int64,
              'image/filename': tfds.features.Text()}
    label = tfds.features.ClassLabel(names=names)
    if self.detection:
      features = {**common, 'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(), 'label': label,
          'is_crowd': np.bool_})}
    else:
      features = {**common, 'label': label}
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    self._report = checks.Report()
    self._eval_gt = None
    return {split: self._generate_examples(split, ann, images)
            for split, ann, images in self.builder_config.splits}

  def _records(self, split: str, ann: str | None, images: str | None
               ) -> Iterator[records.Record]:
    cfg, report = self.builder_config, self._report
    if cfg.format == 'coco_json':
      return coco_json.read(ann, images, split, report)
    if cfg.format == 'voc_xml':
      return voc_xml.read(ann, images, [n for _, n in cfg.classes], split,
                          report)
    if cfg.format == 'od_tfrecord':
      return od_tfrecord.read(od_tfrecord.files(ann, 'annotations'), split,
                              report)
    return image_folder.read(images, split, report)

  def _generate_examples(self, split: str, ann: str | None,
                         images: str | None):
    cfg, report = self.builder_config, self._report
    label_of = {c: i for i, (c, _) in enumerate(cfg.classes)}
    name_of = {n: i for i, (_, n) in enumerate(cfg.classes)}
    kept = []
    for rec in self._records(split, ann, images):
      report.total(split, 'records')
      image = checks.check_image(rec.read(), split, rec.image_id, report,
                                 rec.apply_exif)
      if image is None:
        continue
      out = {'image': image.encoded, 'image/id': rec.image_id,
             'image/filename': rec.name}
      if not self.detection:
        out['label'] = name_of[rec.label]
      else:
        boxes = rec.boxes
        if not rec.apply_exif:  # TFRecords: normalised -> pixels.
          boxes = [[b[0] * image.width, b[1] * image.height,
                    b[2] * image.width, b[3] * image.height] for b in boxes]
        bbox, idx = checks.check_boxes(boxes, rec.categories, set(label_of),
                                       image.height, image.width, split,
                                       rec.image_id, report)
        if not len(idx):
          report.add(split, 'image_no_boxes', rec.image_id)
        cats = [rec.categories[i] for i in idx]
        crowd = [rec.is_crowd[i] for i in idx]
        out['objects'] = {'bbox': bbox,
                          'label': np.asarray([label_of[c] for c in cats],
                                              np.int64),
                          'is_crowd': np.asarray(crowd, bool)}
        report.total(split, 'boxes', len(idx))
        if split == 'validation':
          kept.append(_gt_entry(rec, image, bbox, cats, crowd))
      report.total(split, 'images')
      yield f'{rec.image_id}', out
    if split == 'validation' and self.detection:
      self._eval_gt = _eval_annotations(split, kept, cfg)
    self._finish_metadata()

  def _finish_metadata(self) -> None:
    """Called after each split: the metadata as far as it is known."""
    cfg = self.builder_config
    offset = 1 if self.detection else 0
    self.info.metadata.update({
        'format': cfg.format,
        'source': [list(s) for s in cfg.splits],
        'task': sources.FORMATS[cfg.format],
        'classes': {i + offset: n for i, (_, n) in enumerate(cfg.classes)},
        'category_ids': {i + offset: c
                         for i, (c, _) in enumerate(cfg.classes)},
        'report': self._report.to_json(),
        'eval_groundtruth': self._eval_gt,
    })


def _gt_entry(rec: records.Record, image: checks.CheckedImage,
              bbox: np.ndarray, cats: list[int], crowd: list[bool]) -> dict:
  """The prepared eval image and its boxes in COCO form (original ids)."""
  h, w = image.height, image.width
  anns = []
  for (y0, x0, y1, x1), c, k in zip(bbox.tolist(), cats, crowd):
    bw, bh = (x1 - x0) * w, (y1 - y0) * h
    anns.append({'image_id': rec.image_id, 'category_id': int(c),
                 'bbox': [x0 * w, y0 * h, bw, bh], 'area': bw * bh,
                 'iscrowd': int(k)})
  return {'image': {'id': rec.image_id, 'file_name': rec.name,
                    'height': h, 'width': w}, 'annotations': anns}


def builder(data_cfg: ml_collections.ConfigDict) -> OwnData:
  """The builder of `data_cfg`'s source (prepared or not)."""
  return OwnData(config=source_config(data_cfg), data_dir=_where(data_cfg))


def _write_side_files(b: OwnData, coco_annotations: str | None) -> None:
  """`data_report.json` and, for non-COCO detection, the eval ground truth
  as a COCO JSON (both derived from `metadata.json`; rewritten if absent)."""
  meta = json.load(open(os.path.join(b.data_dir, sources.META_FILE)))
  report_path = os.path.join(b.data_dir, sources.REPORT_FILE)
  if not os.path.exists(report_path):
    with open(report_path, 'w') as f:
      json.dump(meta['report'], f, indent=1)
  gt_path = os.path.join(b.data_dir, EVAL_GT_FILE)
  if meta.get('eval_groundtruth') and not coco_annotations and (
      not os.path.exists(gt_path)):
    with open(gt_path + '.tmp', 'w') as f:
      json.dump(meta['eval_groundtruth'], f)
    os.replace(gt_path + '.tmp', gt_path)


_PREPARED = {}  # (config name, data_dir) -> prepared builder.


def prepared_builder(data_cfg: ml_collections.ConfigDict) -> OwnData:
  """The prepared builder; FileNotFoundError naming the command if not."""
  config = source_config(data_cfg)
  key = (config.name, _where(data_cfg))
  if key in _PREPARED:
    return _PREPARED[key]
  b = OwnData(config=config, data_dir=_where(data_cfg))
  if not b.is_prepared():
    raise FileNotFoundError(
        f'The {data_cfg.name} data is not prepared yet (looked in '
        f'{b.data_dir}). Prepare it once with `{COMMAND}` (the same --config '
        'and --config.data.* flags as for training); single-process '
        'training prepares it on first use.')
  _write_side_files(b, _coco_eval_file(b))
  _PREPARED[key] = b
  return b


def get(data_cfg: ml_collections.ConfigDict) -> OwnData:
  """The prepared builder; prepared on first use by a single process
  (several would race: they are told to run the command first)."""
  try:
    return prepared_builder(data_cfg)
  except FileNotFoundError:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      raise
    return prepare(data_cfg)


def _coco_eval_file(b: OwnData) -> str | None:
  cfg = b.builder_config
  return next((a for s, a, _ in cfg.splits if s == 'validation'), None) if (
      cfg.format == 'coco_json') else None


def eval_annotations(b: OwnData) -> str | None:
  """The eval ground truth in the user's ids: the user's own COCO JSON, the
  one written by preparation, or None (no eval split, or classification)."""
  if not b.detection:
    return None
  coco = _coco_eval_file(b)
  if coco:
    return coco
  path = os.path.join(b.data_dir, EVAL_GT_FILE)
  return path if os.path.exists(path) else None


def prepare(data_cfg: ml_collections.ConfigDict,
            log: Callable[[str], None] = print) -> OwnData:
  """Prepares the source once (a no-op when done) and logs the report."""
  b = builder(data_cfg)
  if b.is_prepared():
    log(f'Already prepared: {b.data_dir}')
  else:
    log(f'Preparing the {data_cfg.name} data into {b.data_dir} ...')
    b.download_and_prepare()
    b = builder(data_cfg)  # Reloaded from what was written.
  _write_side_files(b, _coco_eval_file(b))
  meta = sources.read_meta(b.data_dir)
  log(f'{len(meta["classes"])} classes: ' + ', '.join(
      f'{k}={v}' for k, v in list(meta['classes'].items())[:20]) +
      (' ...' if len(meta['classes']) > 20 else ''))
  log(checks.Report(**_report_fields(meta['report'])).text())
  log(f'Data check report: {os.path.join(b.data_dir, sources.REPORT_FILE)}')
  return b


def _report_fields(report: dict[str, Any]) -> dict[str, Any]:
  """`Report` fields back from `Report.to_json()`."""
  return {'totals': {s: e['totals'] for s, e in report.items()},
          'counts': {s: {k: p['count'] for k, p in e['problems'].items()}
                     for s, e in report.items()},
          'examples': {s: {k: p['examples'] for k, p in e['problems'].items()}
                       for s, e in report.items()}}
