"""Small datasets on disk in every user-data format, with every bad case.

Each writer returns the paths to put in `config.data` and the counts the
data check must report. Images are shapes data (`input_pipeline.shapes`)
of varied sizes, saved as JPEG or PNG; the bad cases are added on top.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from input_pipeline import shapes

NAMES = {7: 'circle', 42: 'square', 1000: 'triangle'}  # Non-contiguous ids.
CATEGORY = dict(zip(range(3), NAMES))  # shapes label -> category id.


def _examples(n: int, split: str):
  cfg = shapes.make_config('detection', image_size=(96, 160))
  return [shapes.render(cfg, split, i) for i in range(n)]


def _save(image: np.ndarray, path: str, mode: str = 'RGB', exif: int = 0
          ) -> None:
  """Saves as JPEG or PNG (by extension), converted to `mode`."""
  im = Image.fromarray(image)
  if mode == 'I;16':
    im = Image.fromarray((np.asarray(im.convert('L'), np.uint16) * 257))
  elif mode != 'RGB':
    im = im.convert(mode)
  kwargs = {}
  if exif:
    e = Image.Exif()
    e[0x0112] = exif
    kwargs['exif'] = e.tobytes()
  im.save(path, **kwargs)


# Bad images among the training images, by position: (kind, extension, mode).
BAD_IMAGES = {1: ('image_grayscale', 'jpg', 'L'),
              2: ('image_alpha', 'png', 'RGBA'),
              3: ('image_palette', 'png', 'P'),
              4: ('image_cmyk', 'jpg', 'CMYK'),
              5: ('image_16bit', 'png', 'I;16'),
              6: ('image_exif_rotated', 'jpg', 'RGB')}


def write_images(examples, folder: str, prefix: str) -> list[dict]:
  """Images on disk (with BAD_IMAGES, a missing and an unreadable one at the
  end); COCO `images` entries with boxes in the pixels viewers show."""
  os.makedirs(folder, exist_ok=True)
  entries = []
  for i, ex in enumerate(examples):
    kind, ext, mode = BAD_IMAGES.get(i, (None, 'png' if i % 3 == 0 else
                                         'jpg', 'RGB'))
    name = f'{prefix}{i:04d}.{ext}'
    image, boxes = ex['image'], ex['boxes'].astype(float)
    if kind == 'image_exif_rotated':  # Stored rotated; EXIF 6 turns it back.
      _save(np.rot90(image, 1).copy(), os.path.join(folder, name), exif=6)
    else:
      _save(image, os.path.join(folder, name), mode)
    h, w = image.shape[:2]
    entries.append({'file_name': name, 'height': h, 'width': w,
                    'boxes': boxes, 'labels': ex['labels']})
  with open(os.path.join(folder, f'{prefix}broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  entries.append({'file_name': f'{prefix}broken.jpg', 'height': 10,
                  'width': 10, 'boxes': np.zeros([0, 4]),
                  'labels': np.zeros([0], int)})
  entries.append({'file_name': f'{prefix}missing.jpg', 'height': 10,
                  'width': 10, 'boxes': np.zeros([0, 4]),
                  'labels': np.zeros([0], int)})
  return entries


def write_coco(root: str, n_train: int = 12, n_eval: int = 6) -> dict:
  """A COCO-JSON dataset with every bad case; the config fields and the
  expected counts of the training split's report."""
  out = {}
  for split, n in (('train', n_train), ('eval', n_eval)):
    images = os.path.join(root, f'{split}_images')
    entries = write_images(_examples(n, 'train' if split == 'train' else
                                     'validation'), images, split)
    coco = {'images': [], 'annotations': [],
            'categories': [{'id': c, 'name': n} for c, n in NAMES.items()]}
    for i, e in enumerate(entries):
      image_id = 9000 + i
      coco['images'].append({'id': image_id, 'file_name': e['file_name'],
                             'height': e['height'], 'width': e['width']})
      for (y0, x0, y1, x1), label in zip(e['boxes'], e['labels']):
        coco['annotations'].append({
            'id': len(coco['annotations']) + 1, 'image_id': image_id,
            'category_id': CATEGORY[int(label)], 'iscrowd': 0,
            'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0)})
    if split == 'train':
      bad = [[float('nan'), 1, 5, 5], [3, 3, 0, 5], [3, 3, -2, 4],
             [500, 500, 10, 10], [-5, -5, 20, 20]]  # nan, 2 empty, out, clip
      for box in bad:
        coco['annotations'].append({'id': len(coco['annotations']) + 1,
                                    'image_id': 9000, 'category_id': 7,
                                    'iscrowd': 0, 'bbox': box})
      coco['annotations'].append({'id': len(coco['annotations']) + 1,
                                  'image_id': 9000, 'category_id': 5,
                                  'iscrowd': 0, 'bbox': [1, 1, 4, 4]})
      coco['annotations'].append({'id': len(coco['annotations']) + 1,
                                  'image_id': 123456, 'category_id': 7,
                                  'iscrowd': 0, 'bbox': [1, 1, 4, 4]})
      coco['images'].append(dict(coco['images'][1]))  # Duplicate id 9001.
      # An image without annotations: a negative.
      coco['images'][7]['id'] = 8000
      coco['annotations'] = [a for a in coco['annotations']
                             if a['image_id'] != 9007]
    path = os.path.join(root, f'{split}.json')
    with open(path, 'w') as f:
      json.dump(coco, f)
    out[f'{split}_annotations'], out[f'{split}_images'] = path, images
  return out


# The training split's expected report counts (write_coco's bad cases).
COCO_TRAIN_COUNTS = {
    'image_missing': 1, 'image_unreadable': 1, 'image_duplicate_id': 1,
    'image_grayscale': 2, 'image_alpha': 1, 'image_palette': 1,
    'image_cmyk': 1, 'image_16bit': 1, 'image_exif_rotated': 1,
    'image_no_boxes': 1, 'box_nonfinite': 1, 'box_empty': 2,
    'box_outside': 1, 'box_clipped': 1, 'box_unknown_category': 1,
    'box_unknown_image': 1}


def write_voc(root: str, n_train: int = 8, n_eval: int = 4) -> dict:
  """A VOC folder (train and val sets) with a difficult object, a box past
  the image, a missing XML and a missing image."""
  voc = os.path.join(root, 'VOC')
  for d in ('Annotations', 'JPEGImages', 'ImageSets/Main'):
    os.makedirs(os.path.join(voc, d), exist_ok=True)
  out = {}
  for split, n, set_name in (('train', n_train, 'train'),
                             ('eval', n_eval, 'val')):
    names = []
    for i, ex in enumerate(_examples(n, 'train' if split == 'train'
                                     else 'validation')):
      name = f'{set_name}_{i:04d}'
      names.append(name)
      if i == n - 1:  # Annotation without an image file.
        pass
      else:
        _save(ex['image'], os.path.join(voc, 'JPEGImages', f'{name}.jpg'))
      h, w = ex['image'].shape[:2]
      objects = ''
      for j, ((y0, x0, y1, x1), label) in enumerate(zip(ex['boxes'],
                                                        ex['labels'])):
        if split == 'train' and i == 0 and j == 0:
          x1 = w + 50  # Past the image: clipped.
        difficult = int(split == 'train' and i == 1 and j == 0)
        objects += (f'<object><name>{NAMES[CATEGORY[int(label)]]}</name>'
                    f'<difficult>{difficult}</difficult><bndbox>'
                    f'<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>'
                    f'<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax>'
                    '</bndbox></object>')
      with open(os.path.join(voc, 'Annotations', f'{name}.xml'), 'w') as f:
        f.write(f'<annotation><filename>{name}.jpg</filename><size>'
                f'<width>{w}</width><height>{h}</height><depth>3</depth>'
                f'</size>{objects}</annotation>')
    names.append(f'{set_name}_nofile')  # No XML.
    with open(os.path.join(voc, 'ImageSets', 'Main', f'{set_name}.txt'),
              'w') as f:
      f.write('\n'.join(names) + '\n')
    out[f'{split}_annotations'] = os.path.join(voc, 'ImageSets', 'Main',
                                               f'{set_name}.txt')
  return out


def write_tfrecord(root: str, n_train: int = 8, n_eval: int = 4) -> dict:
  """Model Garden-style TFRecords (2 files for training), with a label map,
  an undecodable image and a NaN box."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)

  def feature(values, kind):
    if kind == 'bytes':
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == 'float':
      return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

  out = {}
  for split, n in (('train', n_train), ('eval', n_eval)):
    files = [os.path.join(root, f'{split}-{k:05d}-of-00002.tfrecord')
             for k in range(2)]
    writers = [tf.io.TFRecordWriter(f) for f in files]
    for i, ex in enumerate(_examples(n, 'train' if split == 'train'
                                     else 'validation')):
      h, w = ex['image'].shape[:2]
      buf = io.BytesIO()
      Image.fromarray(ex['image']).save(buf, format='JPEG')
      encoded = buf.getvalue() if i != 2 else b'corrupt'
      boxes = ex['boxes'].astype(np.float32) / [h, w, h, w]
      if split == 'train' and i == 0:
        boxes[0, 0] = np.nan
      labels = [CATEGORY[int(l)] for l in ex['labels']]
      feats = {
          'image/encoded': feature([encoded], 'bytes'),
          'image/source_id': feature([str(500 + i).encode()], 'bytes'),
          'image/height': feature([h], 'int'),
          'image/width': feature([w], 'int'),
          'image/object/bbox/ymin': feature(boxes[:, 0], 'float'),
          'image/object/bbox/xmin': feature(boxes[:, 1], 'float'),
          'image/object/bbox/ymax': feature(boxes[:, 2], 'float'),
          'image/object/bbox/xmax': feature(boxes[:, 3], 'float'),
          'image/object/class/label': feature(labels, 'int'),
          'image/object/is_crowd': feature([0] * len(labels), 'int'),
      }
      writers[i % 2].write(tf.train.Example(features=tf.train.Features(
          feature=feats)).SerializeToString())
    for wr in writers:
      wr.close()
    out[f'{split}_annotations'] = os.path.join(root, f'{split}-*.tfrecord')
  label_map = os.path.join(root, 'label_map.pbtxt')
  with open(label_map, 'w') as f:
    f.write(''.join(f"item {{\n  id: {c}\n  name: '{n}'\n}}\n"
                    for c, n in NAMES.items()))
  out['label_map'] = label_map
  return out


def write_folders(root: str, n_train: int = 9, n_eval: int = 3) -> dict:
  """<class>/<image> folders with a grayscale PNG and a text file."""
  out = {}
  cfg = shapes.make_config('classification', image_size=(64, 96))
  for split, n in (('train', n_train), ('eval', n_eval)):
    folder = os.path.join(root, split)
    for i in range(n):
      ex = shapes.render(cfg, 'train' if split == 'train' else 'validation', i)
      d = os.path.join(folder, NAMES[CATEGORY[int(ex['labels'][0])]])
      os.makedirs(d, exist_ok=True)
      _save(ex['image'], os.path.join(d, f'{i}.png' if i == 0 else
                                      f'{i}.jpg'), 'L' if i == 0 else 'RGB')
    with open(os.path.join(d, 'notes.txt'), 'w') as f:
      f.write('not an image')
    out[f'{split}_images'] = folder
  return out
