"""Loads and runs a `jax.export` artifact of spinenet_jax with jax and numpy.

This file imports neither flax nor spinenet_jax nor TensorFlow: the exporter
copies it beside every `--format=jax` artifact as `loader.py`, so that a
serving process needs only `jax` and `numpy`:

```python
import loader                                    # the copy in the artifact dir
model = loader.load('exported/')                 # checks the sha256
batch, scales = model.prepare([image0, image1])  # uint8 RGB, any sizes
out = model(batch)                               # dict of numpy arrays
boxes = out['boxes'] / scales[:, None, None]     # detector: input pixels
```

or from a shell: `python exported/loader.py exported/ image.npy`.

The artifact is trusted input: a serialized `jax.export.Exported` may call
any custom call registered in jaxlib; load only files you made or trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST = 'manifest.json'


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def fit_image(image: np.ndarray, size: int, pad_rgb: Sequence[int]
              ) -> tuple[np.ndarray, float]:
  """One uint8 RGB image -> (uint8 [size, size, 3], scale).

  The long side is resized to `size` keeping the aspect ratio (bilinear, no
  antialiasing, as spinenet_jax's eval pipeline), the rest padded at the
  bottom and right with `pad_rgb` (the mean colour, which the in-graph
  normalisation maps to about zero, as training pads). Boxes of the resized
  image divided by `scale` are in the original image's pixels.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'image has shape {image.shape}; expected [H, W, 3] RGB.')
  image = image[..., :3]
  h, w = image.shape[:2]
  scale = min(size / h, size / w)
  new_hw = tuple(int(min(max(round(d * scale), 1), size)) for d in (h, w))
  resized = jax.image.scale_and_translate(
      jnp.asarray(image, jnp.float32), (*new_hw, 3), (0, 1),
      jnp.array([scale, scale], jnp.float32), jnp.zeros(2, jnp.float32),
      method='linear', antialias=False)
  out = np.empty((size, size, 3), np.uint8)
  out[...] = np.asarray(pad_rgb, np.uint8)
  out[:new_hw[0], :new_hw[1]] = np.clip(np.round(np.asarray(resized)), 0, 255)
  return out, scale


def crop_image(image: np.ndarray, size: int, fraction: float) -> np.ndarray:
  """One uint8 RGB image -> uint8 [size, size, 3]: the central square of
  `fraction` of the short side, resized (bilinear, no antialiasing), as
  spinenet_jax's classification eval pipeline."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  image = image[..., :3]
  h, w = image.shape[:2]
  crop = max(int(fraction * min(h, w)), 1)
  oy, ox = (h - crop + 1) // 2, (w - crop + 1) // 2
  square = jnp.asarray(image[oy:oy + crop, ox:ox + crop], jnp.float32)
  resized = jax.image.resize(square, (size, size, 3), 'bilinear',
                             antialias=False)
  return np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)


class Artifact:
  """A loaded artifact: call it on a uint8 batch `[B, S, S, 3]`."""

  def __init__(self, directory: str, verify: bool = True):
    with open(os.path.join(directory, MANIFEST)) as f:
      self.manifest: dict[str, Any] = json.load(f)
    path = os.path.join(directory, self.manifest['file'])
    if verify and sha256_file(path) != self.manifest['sha256']:
      raise ValueError(f'{path}: sha256 differs from {MANIFEST}; the file is '
                       'damaged or was replaced.')
    with open(path, 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    self.image_size = int(self.manifest['input']['shape'][1])
    self.batch = self.manifest['input']['shape'][0]  # int, or None: any.
    self.labels = {int(k): v for k, v in self.manifest['label_map'].items()}

  def prepare(self, images) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images of any sizes -> (batch [B, S, S, 3], scales [B])."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
      images = [images]
    pre = self.manifest['preprocessing']
    if 'crop_fraction' in pre:  # Classifiers: no boxes, so no scale.
      return (np.stack([crop_image(im, self.image_size, pre['crop_fraction'])
                        for im in images]), np.ones([len(images)], np.float32))
    fitted = [fit_image(im, self.image_size, pre['pad_rgb']) for im in images]
    return (np.stack([f[0] for f in fitted]),
            np.asarray([f[1] for f in fitted], np.float32))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    want = (self.image_size, self.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f'inputs must be uint8 [B, {want[0]}, {want[1]}, 3] '
                       f'(use prepare()); got {images.dtype} {images.shape}.')
    if self.batch is not None and images.shape[0] != self.batch:
      raise ValueError(f'this artifact was exported for batch {self.batch}, '
                       f'got {images.shape[0]} images.')
    out = self.exported.call(images)
    return {k: np.asarray(v) for k, v in out.items()}


def load(directory: str, verify: bool = True) -> Artifact:
  """The artifact in `directory` (written by `spinenet_jax.export`)."""
  return Artifact(directory, verify)


if __name__ == '__main__':
  if len(sys.argv) < 3:
    sys.exit('usage: python loader.py ARTIFACT_DIR IMAGE.npy [...]')
  model = load(sys.argv[1])
  batch, _ = model.prepare([np.load(p) for p in sys.argv[2:]])
  for name, value in model(batch).items():
    print(name, value.shape, value.dtype)
