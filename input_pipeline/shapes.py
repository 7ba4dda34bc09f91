"""A built-in synthetic detection / classification dataset ("shapes").

Importing this module registers the TFDS builder `shapes` with two configs:

* `shapes/detection`: the COCO schema (`image`, `image/id`, `objects/bbox`
  normalised ymin, xmin, ymax, xmax, `objects/label`, `objects/is_crowd`).
  Each image holds 1 to 8 filled circles, squares and triangles of varied
  size (8 to 128 px across), colour, rotation and position on a cluttered,
  textured background. Objects may overlap; larger objects are drawn first
  so that small ones stay visible. Boxes are exact: each is the tight box of
  the object's rasterised pixels (occluded parts included).
* `shapes/classification`: `image`, `label`; one larger shape per image.

Everything is drawn from `numpy.random.default_rng((seed, split, index))`,
so a config always produces the same bytes; no download. Images are JPEG
(quality 90), 256x256 by default. Class ids for detection are the TFDS label
plus one: 1 circle, 2 square, 3 triangle (0 is background).

Sizes other than the registered defaults (e.g. tiny datasets for tests) are
custom configs made by `make_config`, stored under their own name.
"""
from __future__ import annotations

import dataclasses
import io
import math

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from input_pipeline import contract

CLASS_NAMES = contract.SHAPES_CLASS_NAMES  # Index = TFDS label.
# Detection class id -> name (class id = TFDS label + 1; 0 is background).
LABEL_MAP = contract.label_map('shapes/detection', detection=True,
                               label_offset=0)

_SPLIT_IDS = {'train': 0, 'validation': 1}
_TASK_IDS = {'detection': 0, 'classification': 1}
_JPEG_QUALITY = 90
_NOISE_TILE = 512  # Sensor noise is cut from one fixed tile (fast, fixed).
_noise = None


def _noise_tile() -> np.ndarray:
  global _noise
  if _noise is None:
    rng = np.random.default_rng(12345)
    _noise = np.round(rng.normal(0, 5, size=(_NOISE_TILE, _NOISE_TILE, 3))
                      ).astype(np.float32)
  return _noise


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Builder config; all sizes in pixels."""
  task: str = 'detection'  # 'detection' or 'classification'.
  num_train: int = 4000
  num_validation: int = 500
  image_size: tuple[int, int] = (256, 256)  # Min, max of height and width.
  object_size: tuple[int, int] = (8, 128)  # Min, max object diameter.
  max_objects: int = 8
  seed: int = 0


_DEFAULTS = {
    'detection': dict(task='detection', num_train=4000, num_validation=500,
                      image_size=(256, 256), object_size=(8, 128),
                      max_objects=8),
    'classification': dict(task='classification', num_train=4000,
                           num_validation=500, image_size=(256, 256),
                           object_size=(48, 192), max_objects=1),
}


def make_config(task: str = 'detection', **overrides) -> ShapesConfig:
  """Returns the registered config of `task`, or a custom one for overrides.

  Args:
    task: 'detection' or 'classification'.
    **overrides: ShapesConfig fields (`num_train`, `num_validation`,
      `image_size` as an int or (min, max), `object_size`, `max_objects`,
      `seed`); None values are ignored.
  """
  if task not in _DEFAULTS:
    raise ValueError(f'Unknown shapes task {task!r}; expected one of '
                     f'{sorted(_DEFAULTS)}.')
  fields = dict(_DEFAULTS[task], seed=0)
  for key, value in overrides.items():
    if value is None:
      continue
    if key not in fields or key == 'task':
      raise ValueError(f'Unknown shapes config field {key!r}.')
    if key in ('image_size', 'object_size'):
      value = (value, value) if isinstance(value, int) else tuple(value)
      if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f'shapes {key} must be an int or (min, max), got '
                         f'{value!r}.')
      value = (int(value[0]), int(value[1]))
    fields[key] = value
  if fields['num_train'] < 1 or fields['num_validation'] < 1:
    raise ValueError(f'shapes needs at least one example per split, got '
                     f'{fields["num_train"]} / {fields["num_validation"]}.')
  if fields == dict(_DEFAULTS[task], seed=0):
    return Shapes.builder_configs[task]
  (h0, h1), (o0, o1) = fields['image_size'], fields['object_size']
  name = (f'{task}_n{fields["num_train"]}-{fields["num_validation"]}'
          f'_px{h0}-{h1}_obj{o0}-{o1}x{fields["max_objects"]}'
          f'_seed{fields["seed"]}')
  return ShapesConfig(name=name, version='1.0.0',
                      description=f'Custom shapes config {name}.', **fields)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
  """Smooth colour field + stripes + random lines: clutter without shapes."""
  grid = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.uint8)
  base = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR),
                    np.float32)
  theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
  freq = rng.uniform(0.03, 0.25)
  yy, xx = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
  wave = np.sin(2 * np.pi * freq * (yy[:, None] * np.sin(theta) +
                                    xx[None, :] * np.cos(theta)) + phase)
  tint = rng.uniform(-30, 30, size=3).astype(np.float32)
  base += wave[..., None] * tint
  image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(4, 16)):
    points = [tuple(p) for p in rng.uniform(0, [w, h], size=(
        rng.integers(2, 5), 2))]
    draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
              width=int(rng.integers(1, 4)))
  return image


def _polygon(label: int, cx: float, cy: float, r: float,
             rng: np.random.Generator) -> list[tuple[float, float]] | None:
  """Vertices of a square or triangle inscribed in a circle; None: circle."""
  if label == 0:
    return None
  theta = rng.uniform(0, 2 * np.pi)
  if label == 1:
    angles = theta + np.arange(4) * np.pi / 2
  else:
    angles = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(
        -0.25, 0.25, size=3)
  return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray
                     ) -> tuple[int, int, int]:
  """A random colour at least some distance away from `ref` (RGB)."""
  colour = rng.integers(0, 256, 3)
  for _ in range(8):
    if np.abs(colour - ref).sum() > 150:
      break
    colour = rng.integers(0, 256, 3)
  return tuple(int(c) for c in colour)


def render(config: ShapesConfig, split: str, index: int,
           return_masks: bool = False) -> dict[str, np.ndarray]:
  """Draws example `index` of `split`; deterministic.

  Returns:
    Dict with `image` uint8 [H, W, 3] (before JPEG encoding), `boxes` int32
    [N, 4] tight pixel boxes (ymin, xmin, ymax, xmax; max exclusive),
    `labels` int64 [N] (TFDS labels, index into CLASS_NAMES) and, if
    `return_masks`, `masks` bool [N, H, W] (each object's full shape).
  """
  rng = np.random.default_rng(
      (config.seed, _TASK_IDS[config.task], _SPLIT_IDS[split], index))
  h, w = (int(v) for v in rng.integers(config.image_size[0],
                                       config.image_size[1] + 1, size=2))
  image = _background(rng, h, w)
  pixels = np.asarray(image)
  n = 1 if config.task == 'classification' else int(
      rng.integers(1, config.max_objects + 1))
  max_size = min(config.object_size[1], h - 2, w - 2)
  sizes = np.sort(rng.uniform(min(config.object_size[0], max_size), max_size,
                              size=n))[::-1]  # Big ones first (behind).
  boxes, labels, masks = [], [], []
  for size in sizes:
    label = int(rng.integers(len(CLASS_NAMES)))
    r = size / 2
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    mask = Image.new('L', (w, h))
    poly = _polygon(label, cx, cy, r, rng)
    if poly is None:
      ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
      ImageDraw.Draw(mask).polygon(poly, fill=255)
    bbox = mask.getbbox()  # (left, upper, right, lower), right/lower excl.
    if bbox is None:
      continue
    x0, y0, x1, y1 = bbox
    ref = pixels[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    image.paste(_colour_far_from(rng, ref), bbox, mask.crop(bbox))
    boxes.append((y0, x0, y1, x1))
    labels.append(label)
    if return_masks:
      masks.append(np.asarray(mask) > 0)
  tile = _noise_tile()
  if h > tile.shape[0] or w > tile.shape[1]:
    tile = np.tile(tile, (h // tile.shape[0] + 1, w // tile.shape[1] + 1, 1))
  oy, ox = rng.integers(0, tile.shape[0] - h + 1), rng.integers(
      0, tile.shape[1] - w + 1)
  noise = tile[oy:oy + h, ox:ox + w]
  out = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
  result = {'image': out, 'boxes': np.asarray(boxes, np.int32).reshape(-1, 4),
            'labels': np.asarray(labels, np.int64)}
  if return_masks:
    result['masks'] = np.asarray(masks, bool).reshape(-1, h, w)
  return result


def _encode_jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=_JPEG_QUALITY)
  return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes for detection and classification; no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      ShapesConfig(name=task, version='1.0.0',
                   description=f'Shapes for {task}.', **fields)
      for task, fields in _DEFAULTS.items()
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the optional `importlib_resources` package.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    image = tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')
    if cfg.task == 'classification':
      features = {'image': image, 'image/id': np.int64,
                  'label': tfds.features.ClassLabel(names=CLASS_NAMES)}
      supervised_keys = ('image', 'label')
    else:
      features = {
          'image': image, 'image/id': np.int64,
          'objects': tfds.features.Sequence({
              'bbox': tfds.features.BBoxFeature(),
              'label': tfds.features.ClassLabel(names=CLASS_NAMES),
              'is_crowd': np.bool_,
          }),
      }
      supervised_keys = None
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'validation': self._generate_examples('validation',
                                                  cfg.num_validation)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    for index in range(num):
      ex = render(cfg, split, index)
      h, w = ex['image'].shape[:2]
      out = {'image': _encode_jpeg(ex['image']), 'image/id': index}
      if cfg.task == 'classification':
        out['label'] = int(ex['labels'][0])
      else:
        boxes = ex['boxes'].astype(np.float32) / np.float32([h, w, h, w])
        out['objects'] = {'bbox': boxes, 'label': ex['labels'],
                          'is_crowd': np.zeros(len(boxes), bool)}
      yield index, out
