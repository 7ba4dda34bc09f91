"""The data check of `prepare`: every image and box of the user's data is
either used as it is, repaired, or skipped, and each case is counted.

Images (read with PIL):
- missing, unreadable (corrupt, truncated, not an image): skipped;
- grayscale, palette (PNG, GIF), RGBA / LA (alpha dropped onto black, as
  decoding the PNG without alpha would), CMYK, 16-bit, and JPEGs with an
  EXIF orientation (rotated to how viewers show them; the boxes are drawn
  on the rotated image, as COCO and VOC annotators see it): converted to
  8-bit RGB and re-encoded (PNG for PNG sources, JPEG quality 95 otherwise);
- images whose file cannot be used as it is are the only ones re-encoded:
  good JPEGs and PNGs are stored byte for byte.
Boxes (pixels of the image as viewers show it):
- NaN or infinite coordinates, zero or negative width or height, entirely
  outside the image: dropped;
- partly outside: clipped to the image;
- unknown category id: dropped;
- images with no box left (or none to begin with): kept as negatives.
Records:
- duplicate image ids: the first kept, later ones skipped.

`Report` counts every kind per split with the first few example ids, and is
printed and written beside the prepared dataset.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_EXAMPLES = 5  # Example ids kept per kind.
JPEG_QUALITY = 95  # Re-encoded JPEGs.

KINDS = {
    'image_missing': 'skipped: image file missing',
    'image_unreadable': 'skipped: image unreadable (corrupt, truncated or '
                        'not an image)',
    'image_duplicate_id': 'skipped: image id seen before',
    'image_grayscale': 'converted grayscale to RGB',
    'image_palette': 'converted palette to RGB',
    'image_alpha': 'dropped the alpha channel',
    'image_cmyk': 'converted CMYK to RGB',
    'image_16bit': 'reduced 16 bits to 8',
    'image_exif_rotated': 'rotated by its EXIF orientation',
    'image_no_boxes': 'kept without boxes as a negative',
    'box_nonfinite': 'dropped: NaN or infinite coordinates',
    'box_empty': 'dropped: zero or negative width or height',
    'box_outside': 'dropped: entirely outside the image',
    'box_clipped': 'clipped to the image',
    'box_unknown_category': 'dropped: unknown category id',
    'box_unknown_image': 'dropped: refers to an image id not in the list',
    'annotation_unreadable': 'skipped: annotation file missing or invalid',
}


@dataclasses.dataclass
class Report:
  """Counts per kind, with up to `MAX_EXAMPLES` example ids each, per split."""
  counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  examples: dict[str, dict[str, list[str]]] = dataclasses.field(
      default_factory=dict)
  totals: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

  def add(self, split: str, kind: str, example_id: Any, n: int = 1) -> None:
    if kind not in KINDS:
      raise ValueError(f'Unknown data-check kind {kind!r}.')
    if n <= 0:
      return
    counts = self.counts.setdefault(split, {})
    counts[kind] = counts.get(kind, 0) + n
    examples = self.examples.setdefault(split, {}).setdefault(kind, [])
    if len(examples) < MAX_EXAMPLES and str(example_id) not in examples:
      examples.append(str(example_id))

  def total(self, split: str, key: str, n: int = 1) -> None:
    """Counts what was kept ('images', 'boxes') or read ('records')."""
    totals = self.totals.setdefault(split, {})
    totals[key] = totals.get(key, 0) + n

  def to_json(self) -> dict[str, Any]:
    return {split: {'totals': self.totals.get(split, {}),
                    'problems': {k: {'count': n, 'what': KINDS[k],
                                     'examples': self.examples[split][k]}
                                 for k, n in sorted(self.counts.get(
                                     split, {}).items())}}
            for split in sorted(set(self.totals) | set(self.counts))}

  def text(self) -> str:
    lines = []
    for split, entry in self.to_json().items():
      t = entry['totals']
      lines.append(f'{split}: {t.get("images", 0)} images and '
                   f'{t.get("boxes", 0)} boxes kept of '
                   f'{t.get("records", 0)} records read.')
      if not entry['problems']:
        lines.append('  no problems found.')
      for kind, p in entry['problems'].items():
        lines.append(f'  {p["count"]:>6} {kind}: {p["what"]} '
                     f'(e.g. {", ".join(p["examples"])})')
    return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class CheckedImage:
  encoded: bytes  # What is stored: the original bytes, or re-encoded.
  height: int
  width: int
  transposed: bool  # Rotated by its EXIF orientation.


def _exif_orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(0x0112, 1))
  except Exception:  # pylint: disable=broad-except
    return 1


def _to_rgb8(image: Image.Image) -> tuple[Image.Image, list[str]]:
  """8-bit RGB and the conversions it took (`KINDS` keys)."""
  mode, kinds = image.mode, []
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    kinds += ['image_16bit', 'image_grayscale']
    array = np.asarray(image, np.float64)  # PIL opens 16-bit gray as I;16/I.
    image = Image.fromarray(np.round(array * 255.0 / 65535.0).clip(0, 255)
                            .astype(np.uint8), 'L')
  elif mode == 'F':
    kinds.append('image_grayscale')
    image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
  if image.mode == 'P':
    kinds.append('image_palette')
    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    kinds.append('image_alpha')
    image = image.convert('RGB')
  if image.mode == 'CMYK':
    kinds.append('image_cmyk')
    image = image.convert('RGB')
  if image.mode in ('L', '1') and 'image_grayscale' not in kinds:
    kinds.append('image_grayscale')
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return image, kinds


def _reads_as_16bit_png(data: bytes) -> bool:
  """PNG with 16 bits per sample (PIL opens 16-bit RGB as 8-bit RGB)."""
  return data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 25 and data[24] == 16


def check_image(data: bytes | None, split: str, image_id: Any,
                report: Report, apply_exif: bool = True
                ) -> CheckedImage | None:
  """Decodes, repairs and (only if needed) re-encodes one image; None and a
  count in `report` when it cannot be used. `apply_exif=False` leaves the
  pixels as TensorFlow decodes them (it ignores EXIF orientation), for
  sources annotated on TF-decoded images (TFRecords)."""
  if data is None:
    report.add(split, 'image_missing', image_id)
    return None
  try:
    image = Image.open(io.BytesIO(data))
    fmt = image.format
    image.load()
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    del e
    report.add(split, 'image_unreadable', image_id)
    return None
  kinds = ['image_16bit'] if _reads_as_16bit_png(data) else []
  if apply_exif and _exif_orientation(image) != 1:
    image = ImageOps.exif_transpose(image)
    kinds.append('image_exif_rotated')
  image, conversions = _to_rgb8(image)
  kinds += [k for k in conversions if k not in kinds]
  for kind in kinds:
    report.add(split, kind, image_id)
  if not kinds and fmt in ('JPEG', 'PNG'):
    return CheckedImage(data, image.height, image.width, False)
  buf = io.BytesIO()
  if fmt == 'PNG':
    image.save(buf, format='PNG')
  else:
    image.save(buf, format='JPEG', quality=JPEG_QUALITY)
  return CheckedImage(buf.getvalue(), image.height, image.width,
                      'image_exif_rotated' in kinds)


def check_boxes(boxes: Sequence[Sequence[float]], categories: Sequence[int],
                known: set[int], height: int, width: int, split: str,
                image_id: Any, report: Report
                ) -> tuple[np.ndarray, np.ndarray]:
  """Pixel boxes (xmin, ymin, xmax, ymax) -> (kept boxes [N, 4] normalised
  ymin, xmin, ymax, xmax; their indices into the input)."""
  out, kept = [], []
  for i, (box, category) in enumerate(zip(boxes, categories)):
    if category not in known:
      report.add(split, 'box_unknown_category', image_id)
      continue
    try:
      x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
      report.add(split, 'box_nonfinite', image_id)
      continue
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
      report.add(split, 'box_nonfinite', image_id)
      continue
    if x1 <= x0 or y1 <= y0:
      report.add(split, 'box_empty', image_id)
      continue
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
      report.add(split, 'box_outside', image_id)
      continue
    c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)),
         min(y1, float(height)))
    if c != (x0, y0, x1, y1):
      report.add(split, 'box_clipped', image_id)
    out.append((c[1] / height, c[0] / width, c[3] / height, c[2] / width))
    kept.append(i)
  return (np.asarray(out, np.float32).reshape(-1, 4),
          np.asarray(kept, np.int64))

