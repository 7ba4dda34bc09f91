"""The input pipelines on a corpus of malformed records (`sanitize`).

Mocked `coco/2017` and `imagenet2012` (the approach of
test_input_pipeline.py; nothing downloaded): their train and validation
splits mix good records with 138 and 105 malformed ones (corrupt, truncated
and zero-byte JPEG/PNG, bytes that are no image, grayscale, CMYK, RGBA,
gray + alpha, 16-bit, palette, 1x1 and 10000x10000 images; NaN, infinite,
negative, past-the-edge, inverted, outside and zero-size boxes, more boxes
than max_instances, no boxes), their test split holds the good records
alone. Every iterator must run without an exception, use each good record
(and each usable malformed one) exactly once per pass, count each kind of
problem exactly, log them, and leave good records unchanged.
"""
import io
import logging
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import classification
from input_pipeline import common
from input_pipeline import detection
from input_pipeline import sanitize
from spinenet_jax import train_lib
from tests import test_input_pipeline as tip

# pylint: disable=protected-access
_png, _jpeg, _unnormalize = tip._png, tip._jpeg, tip._unnormalize
_config, _write_metadata = tip._config, tip._write_metadata
# pylint: enable=protected-access

H, W = 40, 48  # Side of the corpus images (non-square).
BATCH = 8
DET_SIZE, CLS_SIZE = 64, 32  # Network input sides.
MAX_INSTANCES = 4
IMAGE_COPIES, BOX_COPIES = 5, 3  # Records of each malformed kind.
NUM_GOOD = {'det': 16, 'cls': 17}  # So that the used records fill batches.
SEED = 0


# ------------------------------------------------------------------ images


def _save(image, fmt, **kw):
  image = image if isinstance(image, Image.Image) else Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _solid(colour, h=H, w=W):
  return np.full((h, w, 3), colour, np.uint8)


def _chunk(tag, data):
  return (struct.pack('>I', len(data)) + tag + data +
          struct.pack('>I', zlib.crc32(tag + data)))


def _huge_png(n=10_000):
  """A valid n x n 1-bit grayscale PNG (12 kB; 300 MB decoded to RGB)."""
  row = b'\0' * (1 + n // 8)
  z = zlib.compressobj(9)
  idat = b''.join(z.compress(row) for _ in range(n)) + z.flush()
  return (b'\x89PNG\r\n\x1a\n' +
          _chunk(b'IHDR', struct.pack('>IIBBBBB', n, n, 1, 0, 0, 0, 0)) +
          _chunk(b'IDAT', idat) + _chunk(b'IEND', b''))


def _png_declaring(n, colour):
  """A small PNG whose IHDR (CRC fixed) declares n x n."""
  png = bytearray(_png(_solid(colour)))
  png[16:24] = struct.pack('>II', n, n)
  png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])))
  return bytes(png)


def _jpeg_sof(colour, h, w):
  """A small JPEG whose frame header declares h x w (it decodes so)."""
  jpeg = bytearray(_jpeg(_solid(colour)))
  sof = jpeg.find(b'\xff\xc0')
  jpeg[sof + 5:sof + 9] = struct.pack('>HH', h, w)
  return bytes(jpeg)


def _corrupt_jpeg(colour):
  jpeg = bytearray(_jpeg(_solid(colour)))
  jpeg[2:40] = b'\x13' * 38  # JPEG signature kept, headers garbled.
  return bytes(jpeg)


def _truncated_jpeg(colour):
  """A noisy JPEG cut inside its scan data (the headers are intact)."""
  rng = np.random.default_rng(colour[0])
  jpeg = _jpeg(rng.integers(0, 256, (H, W, 3), np.uint8))
  return jpeg[:int(len(jpeg) * 0.7)]


def _truncated_png(colour):
  png = _png(_solid(colour))
  return png[:len(png) // 2]  # IHDR intact.


def _corrupt_png(colour):
  png = bytearray(_png(_solid(colour)))
  png[png.find(b'IDAT') + 6] ^= 0xFF  # Data no longer matches its CRC.
  return bytes(png)


def _gray(colour):
  return np.full((H, W), colour[0], np.uint8)


def _web(colour):  # The nearest colour of PIL's palette (multiples of 51).
  return tuple(int(51 * round(c / 51)) for c in colour)


_HUGE_PNG = _huge_png()

# Image kinds: name -> (bytes from a colour, the RGB expected once decoded
# (None: skipped), problems counted). JPEG kinds end in 'jpeg'.
GOOD_KINDS = {
    'good_jpeg': (lambda c: _jpeg(_solid(c)), lambda c: c, {}),
    'good_png': (lambda c: _png(_solid(c)), lambda c: c, {}),
}
IMAGE_KINDS = {
    # Skipped before decoding.
    'zero_byte': (lambda c: b'', None, {'image_empty': 1}),
    'real_10000x10000_png': (lambda c: _HUGE_PNG, None,
                             {'image_too_large': 1}),
    'png_declaring_10000x10000': (lambda c: _png_declaring(10_000, c), None,
                                  {'image_too_large': 1}),
    '10000x10000_jpeg': (lambda c: _jpeg_sof(c, 10_000, 10_000), None,
                         {'image_too_large': 1}),
    # Undecodable.
    'corrupt_jpeg': (_corrupt_jpeg, None, {'image_undecodable': 1}),
    'zero_size_jpeg': (lambda c: _jpeg_sof(c, 0, 0), None,
                       {'image_undecodable': 1}),
    'truncated_jpeg': (_truncated_jpeg, None, {'image_undecodable': 1}),
    'truncated_png': (_truncated_png, None, {'image_undecodable': 1}),
    'corrupt_png': (_corrupt_png, None, {'image_undecodable': 1}),
    'not_an_image': (lambda c: b'not an image', None,
                     {'image_undecodable': 1}),
    # Converted and counted.
    'grayscale_png': (lambda c: _save(_gray(c), 'PNG'),
                      lambda c: (c[0],) * 3, {'image_grayscale': 1}),
    'grayscale_jpeg': (lambda c: _save(_gray(c), 'JPEG', quality=95),
                       lambda c: (c[0],) * 3, {'image_grayscale': 1}),
    'cmyk_jpeg': (lambda c: _save(Image.fromarray(_solid(c)).convert('CMYK'),
                                  'JPEG', quality=95),
                  lambda c: c, {'image_cmyk': 1}),
    'rgba_png': (lambda c: _save(np.dstack([_solid(c), _gray((100,))]),
                                 'PNG'),
                 lambda c: c, {'image_alpha': 1}),
    'gray_alpha_png': (lambda c: _save(Image.fromarray(
        np.dstack([_gray(c), _gray((100,))]), 'LA'), 'PNG'),
                       lambda c: (c[0],) * 3,
                       {'image_grayscale': 1, 'image_alpha': 1}),
    'rgb_16bit_png': (lambda c: tf.io.encode_png(tf.constant(
        _solid(c).astype(np.uint16) * 257)).numpy(), lambda c: c,
                      {'image_16bit': 1}),
    'gray_16bit_png': (lambda c: tf.io.encode_png(tf.constant(
        _gray(c)[..., None].astype(np.uint16) * 257)).numpy(),
                       lambda c: (c[0],) * 3,
                       {'image_grayscale': 1, 'image_16bit': 1}),
    # Used as they are, uncounted.
    '1x1_png': (lambda c: _png(_solid(c, 1, 1)), lambda c: c, {}),
    '1x1_jpeg': (lambda c: _jpeg(_solid(c, 1, 1)), lambda c: c, {}),
    'palette_png': (lambda c: _save(Image.fromarray(_solid(_web(c))).convert(
        'P'), 'PNG'), _web, {}),
    '1x1_palette_png': (lambda c: _save(Image.fromarray(
        _solid(_web(c), 1, 1)).convert('P'), 'PNG'), _web, {}),
}

NAN, INF = float('nan'), float('inf')
GOOD_BOX = [0.25, 0.25, 0.75, 0.75]
# Box kinds (on a good PNG): name -> (boxes, boxes kept, problems counted).
BOX_KINDS = {
    'nan_box': ([[NAN, 0.1, 0.5, 0.5], GOOD_BOX], [GOOD_BOX],
                {'box_nonfinite': 1}),
    'infinite_box': ([[0.1, -INF, 0.5, 0.5], GOOD_BOX], [GOOD_BOX],
                     {'box_nonfinite': 1}),
    'negative_box': ([[-0.25, -0.5, 0.5, 0.5]], [[0, 0, 0.5, 0.5]],
                     {'box_clipped': 1}),
    'box_past_the_edge': ([[0.5, 0.5, 1.5, 1.25]], [[0.5, 0.5, 1, 1]],
                          {'box_clipped': 1}),
    'inverted_box': ([[0.75, 0.5, 0.25, 0.125]], [[0.25, 0.125, 0.75, 0.5]],
                     {'box_inverted': 1}),
    'inverted_clipped_box': ([[1.5, 0.5, 0.25, -0.5]], [[0.25, 0, 1, 0.5]],
                             {'box_inverted': 1, 'box_clipped': 1}),
    'outside_boxes': ([[1.25, 1.25, 1.5, 1.5], [-0.5, -0.5, -0.25, -0.25],
                       [0.5, 1.0, 0.75, 1.25], GOOD_BOX], [GOOD_BOX],
                      {'box_outside': 3}),
    'zero_size_boxes': ([[0.25, 0.25, 0.25, 0.75], [0.5, 0.5, 0.75, 0.5],
                         GOOD_BOX], [GOOD_BOX], {'box_empty': 2}),
    'only_bad_boxes': ([[NAN] * 4, [1.2, 1.2, 1.4, 1.4]], [],
                       {'box_nonfinite': 1, 'box_outside': 1,
                        'image_no_boxes': 1}),
    'no_boxes': ([], [], {'image_no_boxes': 1}),
    'too_many_boxes': ([[0.1 * k, 0.1 * k, 0.1 * k + 0.2, 0.1 * k + 0.3]
                        for k in range(7)],
                       [[0.1 * k, 0.1 * k, 0.1 * k + 0.2, 0.1 * k + 0.3]
                        for k in range(MAX_INSTANCES)],
                       {'box_over_max_instances': 7 - MAX_INSTANCES}),
}
# Identities: detection image ids 1000 + i, classification labels i.
GOOD_BOXES = [GOOD_BOX, [0.1, 0.2, 0.4, 0.9]]


def _colour(i):
  return tuple(int(40 + (i * m) % 176) for m in (53, 97, 31))


def _records(task):
  """The corpus of `task` ('det', 'cls'): dicts in train-split order."""
  specs = [(k, IMAGE_KINDS[k], None) for k in IMAGE_KINDS
           for _ in range(IMAGE_COPIES)]
  if task == 'det':
    specs += [(k, GOOD_KINDS['good_png'], BOX_KINDS[k]) for k in BOX_KINDS
              for _ in range(BOX_COPIES)]
  goods = list(GOOD_KINDS.items())
  specs += [(goods[j % 2][0], goods[j % 2][1], None)
            for j in range(NUM_GOOD[task])]
  order = np.random.default_rng(1).permutation(len(specs))
  specs = [specs[j] for j in order]
  # A skipped record first, a good one last (an epoch then ends a batch).
  first = next(j for j, s in enumerate(specs) if s[0] == 'zero_byte')
  last = max(j for j, s in enumerate(specs) if s[0] in GOOD_KINDS)
  specs.insert(0, specs.pop(first))
  specs.append(specs.pop(last))
  records = []
  for i, (kind, (make, expect, problems), boxes) in enumerate(specs):
    c = _colour(i)
    raw, kept, box_problems = ((GOOD_BOXES, GOOD_BOXES, {})
                               if boxes is None else boxes)
    records.append(dict(
        index=i, kind=kind, good=kind in GOOD_KINDS, image=make(c),
        used=expect is not None, colour=expect and expect(c),
        problems={**problems, **(box_problems if expect else {})},
        boxes=np.float32(raw).reshape(-1, 4),
        kept=np.float32(kept).reshape(-1, 4)))
  return records


def _example(task, r):
  """The TFDS example of record `r`."""
  if task == 'cls':
    return {'image': r['image'], 'label': np.int64(r['index']),
            'file_name': f'{r["index"]}.JPEG'}
  n = len(r['boxes'])
  return {'image': r['image'], 'image/filename': f'{r["index"]}.jpg',
          'image/id': np.int64(1000 + r['index']),
          'objects': {'id': np.arange(n, dtype=np.int64),
                      'area': np.full(n, 100, np.int64), 'bbox': r['boxes'],
                      'label': np.zeros(n, np.int64),
                      'is_crowd': np.zeros(n, bool)}}


def _spec(x):
  x = np.asarray(x)
  dtype = tf.string if x.dtype.kind in 'SU' else tf.as_dtype(x.dtype)
  return tf.TensorSpec([None] * x.ndim, dtype)


def _as_dataset_fn(splits):
  """A mocked `_as_dataset`: `splits[dataset name][split]`, examples."""
  def as_dataset_fn(self, split, decoders=None, read_config=None,
                    shuffle_files=False, **kwargs):
    del read_config, shuffle_files, kwargs
    assert isinstance(decoders['image'], tfds.decode.SkipDecoding)
    assert getattr(split, 'count', 1) == 1
    examples = splits[self.name][getattr(split, 'split', split)]
    signature = tf.nest.map_structure(_spec, examples[0])
    return tf.data.Dataset.from_generator(lambda: iter(examples),
                                          output_signature=signature)
  return as_dataset_fn


def _expected_counts(records):
  counts = dict.fromkeys(sanitize.KINDS, 0)
  for r in records:
    for k, n in r['problems'].items():
      counts[k] += n
  return counts


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(records, configs) per task, with the mocked datasets in place."""
  data_dir = tmp_path_factory.mktemp('tfds')
  records = {t: _records(t) for t in ('det', 'cls')}
  splits = {}
  for task, name in (('det', 'coco/2017'), ('cls', 'imagenet2012')):
    train = [_example(task, r) for r in records[task]]
    valid = train[::-1]  # Starts good, ends with a skipped record.
    good = [e for e, r in zip(train, records[task]) if r['good']]
    splits[name.split('/')[0]] = {'train': train, 'validation': valid,
                                  'test': good}
    _write_metadata(name, str(data_dir), {
        s: len(e) for s, e in splits[name.split('/')[0]].items()})
  configs = {
      'det': _config('coco/2017', data_dir, image_size=DET_SIZE,
                     aug_scale_min=1.0, aug_scale_max=1.0,
                     max_instances=MAX_INSTANCES, shuffle_buffer=1),
      'cls': _config('imagenet2012', data_dir, image_size=CLS_SIZE,
                     label_offset=0, shuffle_buffer=1)}
  for task in records:
    n = len(records[task])
    used = sum(r['used'] for r in records[task])
    assert used % BATCH == 0
    assert n - NUM_GOOD[task] >= 100  # Malformed records.
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(splits),
                              data_dir=str(data_dir)):
    yield records, configs


def _summaries(caplog, name):
  return [r.getMessage() for r in caplog.records
          if r.getMessage().startswith(f'{name} data:')]


def _check_problems(it, records, caplog, name, final):
  expected = _expected_counts(records)
  assert it.data_problems() == expected
  # What train_lib writes to metrics.jsonl at log steps and evaluations.
  assert train_lib.data_metrics(it, 'data') == {
      f'data/{k}': n for k, n in expected.items() if n}
  assert it.num_skipped == sum(not r['used'] for r in records)
  lines = _summaries(caplog, name)
  assert lines
  if final:  # One pass: the last line has the final counts.
    assert lines[-1] == sanitize.summary(name, expected)
    for phrase in ('skipped 5 empty (zero-byte) images',
                   'skipped 30 undecodable (corrupt or truncated) images',
                   'skipped 15 images over data.max_image_pixels',
                   'converted 20 grayscale images to RGB',
                   'converted 5 CMYK images to RGB',
                   'dropped the alpha channel of 10 images',
                   'reduced 10 16-bit images to 8 bits'):
      assert phrase in lines[-1]


def _rows(batches, keys, id_key):
  """{id: {key: row}} of the real (unpadded) examples of `batches`."""
  rows = {}
  for b in batches:
    for j in range(len(b[id_key])):
      if 'mask' in b and not b['mask'][j]:
        continue
      assert int(b[id_key][j]) not in rows
      rows[int(b[id_key][j])] = {k: b[k][j] for k in keys}
  return rows


def _tensors(example):
  return tf.nest.map_structure(tf.constant, example)


def _eval_pass(pipeline, cfg, records, caplog, name, id_key, id_offset):
  """One pass of `pipeline.eval_iterator`: every batch there, the used
  records in order (`id_key` = `id_offset` + index) and their problems
  counted. Returns the iterator and its batches."""
  with caplog.at_level(logging.WARNING):
    it = pipeline.eval_iterator(cfg, batch_size=BATCH)
    batches = list(it)
  assert len(batches) == -(-len(records) // BATCH)
  ids = np.concatenate([b[id_key][b['mask']] for b in batches])
  np.testing.assert_array_equal(
      ids, [id_offset + r['index'] for r in records if r['used']])
  _check_problems(it, records, caplog, name, final=True)
  return it, batches


# --------------------------------------------------------------- detection


def test_detection_eval_on_bad_data(corpus, caplog):
  records, configs = corpus
  records, cfg = records['det'][::-1], configs['det']  # Validation order.
  it, batches = _eval_pass(detection, cfg, records, caplog, 'coco/2017 eval',
                           'image_id', 1000)
  assert it.data_problems()['box_over_max_instances'] == 9
  keys = ('image', 'scale', 'orig_size', 'gt_boxes', 'gt_classes',
          'gt_is_crowd')
  rows = _rows(batches, keys, 'image_id')
  for r in records:
    if not r['used']:
      continue
    row = rows[1000 + r['index']]
    n = len(r['kept'])
    hw = row['orig_size'].astype(np.float32)
    np.testing.assert_allclose(row['gt_boxes'][:n],
                               r['kept'] * np.tile(hw, 2), atol=1e-4)
    np.testing.assert_array_equal(row['gt_classes'][:n], 1)
    assert (row['gt_classes'][n:] == -1).all()
    assert (row['gt_boxes'][n:] == -1).all()
    assert np.isfinite(row['image']).all()
  # Good records come out as from a clean dataset.
  clean_cfg = cfg.copy_and_resolve_references()
  clean_cfg.eval_split = 'test'
  clean = _rows(list(detection.eval_iterator(clean_cfg, batch_size=BATCH)),
                keys, 'image_id')
  assert len(clean) == NUM_GOOD['det']
  for image_id, row in clean.items():
    for k in keys:
      np.testing.assert_array_equal(rows[image_id][k], row[k])


def test_detection_train_on_bad_data(corpus, caplog):
  records, configs = corpus
  records, cfg = records['det'], configs['det']
  used = [r for r in records if r['used']]
  with caplog.at_level(logging.WARNING):
    it = detection.train_iterator(cfg, batch_size=BATCH, seed=SEED,
                                  with_ids=True)
    batches = [next(it) for _ in range(len(used) // BATCH)]  # One epoch.
  assert it.position == len(records)
  ids = np.concatenate([b['image_id'] for b in batches])
  assert sorted(ids) == [1000 + r['index'] for r in used]
  _check_problems(it, records, caplog, 'coco/2017 train', final=False)
  # Good records come out as alone through the same augmentation.
  keys = ('image', 'boxes', 'classes', 'is_crowd')
  rows = _rows(batches, keys, 'image_id')
  class_fn = detection.class_mapper(common.get_builder(cfg))
  for r in records:
    if r['used']:
      assert (rows[1000 + r['index']]['classes'] >= 0).sum() == min(
          len(r['kept']), MAX_INSTANCES)
    if not r['good']:
      continue
    out = detection.preprocess_train(
        _tensors(_example('det', r)),
        common.example_key(SEED, 0, tf.constant(r['index'], tf.int64)),
        size=DET_SIZE, scale_min=1.0, scale_max=1.0,
        max_instances=MAX_INSTANCES, class_fn=class_fn)
    for k in keys:
      np.testing.assert_array_equal(rows[1000 + r['index']][k],
                                    out[k].numpy())


# ---------------------------------------------------------- classification


def test_classification_eval_on_bad_data(corpus, caplog):
  records, configs = corpus
  records, cfg = records['cls'][::-1], configs['cls']
  _, batches = _eval_pass(classification, cfg, records, caplog,
                          'imagenet2012 eval', 'label', 0)
  rows = _rows(batches, ('image',), 'label')
  for r in records:  # Solid colours, converted to RGB where needed.
    if r['used']:
      pixels = _unnormalize(rows[r['index']]['image'])
      tol = 4 if r['kind'].endswith('jpeg') else 0.5
      np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), r['colour'],
                                 atol=tol, err_msg=r['kind'])
  clean_cfg = cfg.copy_and_resolve_references()
  clean_cfg.eval_split = 'test'
  clean = _rows(list(classification.eval_iterator(clean_cfg,
                                                  batch_size=BATCH)),
                ('image',), 'label')
  assert len(clean) == NUM_GOOD['cls']
  for label, row in clean.items():
    np.testing.assert_array_equal(rows[label]['image'], row['image'])


def test_classification_train_on_bad_data(corpus, caplog):
  records, configs = corpus
  records, cfg = records['cls'], configs['cls']
  used = [r for r in records if r['used']]
  with caplog.at_level(logging.WARNING):
    it = classification.train_iterator(cfg, batch_size=BATCH, seed=SEED)
    batches = [next(it) for _ in range(len(used) // BATCH)]
  assert it.position == len(records)
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels) == [r['index'] for r in used]
  _check_problems(it, records, caplog, 'imagenet2012 train', final=False)
  rows = _rows(batches, ('image',), 'label')
  for r in records:
    if r['good']:
      out = classification.preprocess_train(
          _tensors(_example('cls', r)),
          common.example_key(SEED, 0, tf.constant(r['index'], tf.int64)),
          size=CLS_SIZE)
      np.testing.assert_array_equal(rows[r['index']]['image'],
                                    out['image'].numpy())
