"""Malformed records: guarded decoding, box repair, and a count per kind.

Every problem the pipelines meet has a kind (`KINDS`, also the order of the
per-example problem vector). What happens to each:

* Images. Zero-byte ones and those whose header declares more than
  `data.max_image_pixels` pixels (default `MAX_IMAGE_PIXELS`, 8192 x 8192,
  so a 10000 x 10000 image, 300 MB decoded and 1.2 GB as floats, is over)
  are skipped before decoding; bytes that fail to decode (corrupt,
  truncated, unknown format) are skipped by `ignore_errors` and counted from
  the gaps they leave in the stream index (`image_undecodable`).
  Grayscale, CMYK, alpha (RGBA, gray + alpha) and 16-bit images are
  decoded to 8-bit RGB (alpha dropped, 16-bit values scaled to 0..255) and
  used, and counted. Other odd images (1 x 1, palette, huge ones under the
  limit) are used as they are, uncounted.
* Boxes (normalised ymin, xmin, ymax, xmax). NaN or infinite coordinates,
  zero width or height, and no overlap with the image: dropped. Min > max
  on an axis: the corners are swapped. Partly outside [0, 1]: clipped. A
  kept box counts once per repair; a dropped box once, for its first reason
  in that order. Boxes past `data.max_instances` are dropped (training:
  those left after the crop). Images with no box left after the repair
  (or none to begin with) are kept as negative examples (`image_no_boxes`).

Counting is deterministic and process-local: each example carries a problem
vector [len(KINDS)] int32 and a keep flag (`outputs`); `drop_skipped`
removes the skipped examples and adds their vectors to the next kept one;
the NumPy iterator strips both and sums them into a `Tally`, which its
`data_problems()` returns and which logs one summary line when the counts
change. Good records pass through bitwise unchanged.
"""
from __future__ import annotations

import logging
import time

import ml_collections
import numpy as np
import tensorflow as tf

Features = dict[str, tf.Tensor]

PROBLEMS_KEY = '_problems'  # Internal: int32 [len(KINDS)] per example.
KEEP_KEY = '_keep'  # Internal: False for an example skipped in-graph.
MAX_IMAGE_PIXELS = 8192 * 8192  # 10000 x 10000 is over.
LOG_EVERY_S = 60.0  # Shortest interval between two summary lines.

# Kind -> what was done, for the log line ({n}: count; {s}, {es}: plural).
KINDS = {
    'image_empty': 'skipped {n} empty (zero-byte) image{s}',
    'image_undecodable': 'skipped {n} undecodable (corrupt or truncated) '
                         'image{s}',
    'image_too_large': 'skipped {n} image{s} over data.max_image_pixels',
    'image_grayscale': 'converted {n} grayscale image{s} to RGB',
    'image_cmyk': 'converted {n} CMYK image{s} to RGB',
    'image_alpha': 'dropped the alpha channel of {n} image{s}',
    'image_16bit': 'reduced {n} 16-bit image{s} to 8 bits',
    'image_no_boxes': 'kept {n} image{s} without boxes as negatives',
    'box_nonfinite': 'dropped {n} box{es} with NaN or infinite coordinates',
    'box_empty': 'dropped {n} box{es} of zero width or height',
    'box_outside': 'dropped {n} box{es} outside the image',
    'box_inverted': 'swapped the corners of {n} inverted box{es}',
    'box_clipped': 'clipped {n} box{es} to the image',
    'box_over_max_instances': 'dropped {n} box{es} over data.max_instances',
}
SKIPPED_IN_GRAPH = ('image_empty', 'image_too_large')

# A 1x1 black RGB PNG, decoded in place of a skipped image.
_PLACEHOLDER = (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00'
                b'\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde\x00\x00\x00\x0c'
                b'IDATx\x9cc```\x00\x00\x00\x04\x00\x01\xf6\x178U\x00\x00'
                b'\x00\x00IEND\xaeB`\x82')
_PNG_SIGNATURE = list(b'\x89PNG\r\n\x1a\n')
_HEAD = 32  # Header bytes read for PNG and GIF sizes.


def max_image_pixels(data_cfg: ml_collections.ConfigDict) -> int:
  """`data.max_image_pixels`, or `MAX_IMAGE_PIXELS` if unset."""
  return int(data_cfg.get('max_image_pixels') or MAX_IMAGE_PIXELS)


def flags(**counts) -> tf.Tensor:
  """Problem vector [len(KINDS)] int32: `counts`, zero for other kinds."""
  unknown = set(counts) - set(KINDS)
  if unknown:
    raise ValueError(f'Unknown problem kinds {sorted(unknown)}.')
  return tf.stack([tf.cast(counts.get(k, 0), tf.int32) for k in KINDS])


def _head(encoded: tf.Tensor) -> tf.Tensor:
  """The first `_HEAD` bytes, zero padded, as int64 [_HEAD]."""
  head = tf.strings.join([tf.strings.substr(encoded, 0, _HEAD),
                          tf.constant(b'\0' * _HEAD)])
  head = tf.io.decode_raw(tf.strings.substr(head, 0, _HEAD), tf.uint8)
  return tf.cast(tf.reshape(head, [_HEAD]), tf.int64)


def _jpeg_info(encoded: tf.Tensor) -> tf.Tensor:
  h, w, c = tf.unstack(tf.image.extract_jpeg_shape(encoded, tf.int64))
  zero = tf.constant(0, tf.int64)
  return tf.stack([h, w, tf.cast(c == 1, tf.int64), tf.cast(c == 4, tf.int64),
                   zero, zero])


def _other_info(encoded: tf.Tensor) -> tf.Tensor:
  """PNG (IHDR) and GIF (screen) sizes and colour types; zeros otherwise."""
  b = _head(encoded)
  be32 = lambda i: ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]
  le16 = lambda i: b[i] + 256 * b[i + 1]
  depth, colour = b[24], b[25]  # Colour 0: gray, 4: gray + alpha, 6: RGBA.
  as_int = lambda x: tf.cast(x, tf.int64)
  png = tf.stack([be32(20), be32(16), as_int((colour == 0) | (colour == 4)),
                  as_int(0), as_int((colour == 4) | (colour == 6)),
                  as_int(depth == 16)])
  gif = tf.stack([le16(8), le16(6)] + [as_int(0)] * 4)
  is_png = tf.reduce_all(tf.equal(b[:8], _PNG_SIGNATURE))
  is_gif = tf.reduce_all(tf.equal(b[:4], list(b'GIF8')))
  return tf.where(is_png, png, tf.where(is_gif, gif, tf.zeros_like(png)))


def header_info(encoded: tf.Tensor) -> tf.Tensor:
  """int64 [6] from the header only: height, width (0 if unknown: not
  JPEG, PNG or GIF), grayscale, CMYK, alpha, 16-bit (0 or 1 each).

  A JPEG whose header cannot be read raises (the example is then skipped).
  """
  return tf.cond(tf.io.is_jpeg(encoded), lambda: _jpeg_info(encoded),
                 lambda: _other_info(encoded))


def check_image(encoded: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Screens encoded image bytes before decoding.

  Returns:
    The bytes to decode (a 1x1 placeholder for a skipped image), the
    image's problem vector, and whether the example is kept.
  """
  h, w, gray, cmyk, alpha, bits16 = tf.unstack(header_info(encoded))
  empty = tf.equal(tf.strings.length(encoded), 0)
  too_large = tf.logical_and(h * w > max_pixels, tf.logical_not(empty))
  keep = tf.logical_not(tf.logical_or(empty, too_large))
  seen = lambda x: tf.logical_and(keep, x > 0)
  problems = flags(image_empty=empty, image_too_large=too_large,
                   image_grayscale=seen(gray), image_cmyk=seen(cmyk),
                   image_alpha=seen(alpha), image_16bit=seen(bits16))
  encoded = tf.cond(keep, lambda: encoded, lambda: tf.constant(_PLACEHOLDER))
  return encoded, problems, keep


def _count(mask: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.cast(mask, tf.int32))


def clean_boxes(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Repairs normalised yxyx boxes [N, 4] (see the module docstring).

  Returns:
    The repaired boxes [N, 4], which to keep [N] bool, the problem vector.
  """
  finite = tf.reduce_all(tf.math.is_finite(boxes), -1)
  boxes = tf.where(finite[:, None], boxes, tf.zeros_like(boxes))
  lo, hi = boxes[:, :2], boxes[:, 2:]
  inverted = tf.reduce_any(lo > hi, -1)
  lo, hi = tf.minimum(lo, hi), tf.maximum(lo, hi)
  empty = tf.logical_and(finite, tf.reduce_any(tf.equal(lo, hi), -1))
  fixed = tf.concat([lo, hi], -1)
  clipped = tf.clip_by_value(fixed, 0.0, 1.0)
  keep = tf.logical_and(
      finite, tf.reduce_all(clipped[:, 2:] > clipped[:, :2], -1))
  outside = tf.logical_and(finite, tf.logical_not(tf.logical_or(empty, keep)))
  changed = tf.reduce_any(tf.not_equal(clipped, fixed), -1)
  problems = flags(
      box_nonfinite=_count(tf.logical_not(finite)), box_empty=_count(empty),
      box_outside=_count(outside),
      box_inverted=_count(tf.logical_and(keep, inverted)),
      box_clipped=_count(tf.logical_and(keep, changed)),
      image_no_boxes=tf.equal(_count(keep), 0))
  return clipped, keep, problems


def outputs(keep: tf.Tensor, image_problems: tf.Tensor,
            *problems: tf.Tensor) -> Features:
  """The internal features of an example; a skipped image counts only its
  own problems."""
  other = tf.add_n(problems) if problems else tf.zeros_like(image_problems)
  other = tf.where(keep, other, tf.zeros_like(other))
  return {PROBLEMS_KEY: image_problems + other, KEEP_KEY: keep}


def no_problems() -> Features:
  """The internal features of a clean, kept example (e.g. padding)."""
  return {PROBLEMS_KEY: tf.zeros([len(KINDS)], tf.int32),
          KEEP_KEY: tf.constant(True)}


def drop_skipped(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples not kept; their problems ride on the next kept one."""
  def carry(pending, ex):
    total = pending + ex[PROBLEMS_KEY]
    pending = tf.where(ex[KEEP_KEY], tf.zeros_like(total), total)
    return pending, {**ex, PROBLEMS_KEY: total}

  ds = ds.scan(tf.zeros([len(KINDS)], tf.int32), carry)
  return ds.filter(lambda ex: ex[KEEP_KEY])


def summary(name: str, counts: dict[str, int]) -> str:
  """One log line: '<name> data: skipped 3 undecodable ..., clipped ...'."""
  parts = [KINDS[k].format(n=n, s='' if n == 1 else 's',
                           es='' if n == 1 else 'es')
           for k, n in counts.items() if n]
  return f'{name} data: {", ".join(parts) or "no problems"} (so far).'


class Tally:
  """Problem counts per kind of one iterator, summed over what it yielded.

  `image_undecodable` is the number of examples skipped (from the stream
  index gaps, `set_skipped`) less those skipped in-graph.
  """

  def __init__(self, name: str, log_every_s: float = LOG_EVERY_S):
    self._name = name
    self._every = log_every_s
    self._sums = np.zeros(len(KINDS), np.int64)
    self._skipped = 0
    self._logged = self.counts()
    self._last_log = -np.inf

  def add(self, problems: np.ndarray) -> None:
    """Adds problem vectors [..., len(KINDS)]."""
    self._sums += np.asarray(problems).reshape(-1, len(KINDS)).sum(0)

  def set_skipped(self, skipped: int) -> None:
    """All examples skipped so far, for whatever reason."""
    self._skipped = skipped

  def counts(self) -> dict[str, int]:
    counts = dict(zip(KINDS, (int(n) for n in self._sums)))
    counts['image_undecodable'] = self._skipped - sum(
        counts[k] for k in SKIPPED_IN_GRAPH)
    return counts

  def log(self, force: bool = False) -> None:
    """Logs the counts if they changed (at most every `log_every_s` s)."""
    counts = self.counts()
    now = time.monotonic()
    if counts == self._logged or (not force and
                                  now - self._last_log < self._every):
      return
    self._logged, self._last_log = counts, now
    logging.warning('%s', summary(self._name, counts))
