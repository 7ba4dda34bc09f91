"""Use a trained run: `load_checkpoint(workdir)` -> features, detect, classify.

```python
import spinenet_jax as snj
run = snj.load_checkpoint('runs/demo')          # latest step; EMA weights if kept
dets = run.detect([image0, image1])             # uint8 RGB arrays, any sizes
```

Only the model's variables (params, batch statistics, EMA params) are read
from the Orbax checkpoint; the optimizer state is never loaded. Variables are
replicated over all local devices and batches are split over them.
Preprocessing matches the eval pipelines (`input_pipeline`): detection
resizes the long side to `config.data.image_size` (keeping the aspect ratio,
bilinear, no antialiasing) and pads bottom/right; classification takes the
central 87.5% square and resizes it to `image_size`. Both normalise with the
ImageNet mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import contract
from input_pipeline import sources
from spinenet_jax import checkpoints
from spinenet_jax import models
from spinenet_jax import quiet_restore
from spinenet_jax.detection import postprocess

LABEL_MAP_FILE = 'label_map.json'  # Written beside a run's checkpoints.


def label_map(config: ml_collections.ConfigDict,
              workdir: str | None = None) -> dict[int, str]:
  """Class id -> name of a run's outputs ('class N' for unknown ids): the
  run's `label_map.json` when there is one, else from its dataset (the
  user's class names for user data, when the prepared data is at hand)."""
  path = workdir and os.path.join(workdir, LABEL_MAP_FILE)
  if path and os.path.exists(path):
    with open(path) as f:
      return {int(k): v for k, v in json.load(f).items()}
  if sources.is_source(config.data.name):
    try:
      return dict(sources.dataset_meta(config.data)['classes'])
    except (FileNotFoundError, ValueError):
      return {}
  return contract.label_map(config.data.name, config.task == 'retinanet',
                            config.data.label_offset)


def save_label_map(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the run's class names as `label_map.json` (process 0)."""
  if jax.process_index() != 0:
    return
  labels = label_map(config)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LABEL_MAP_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump({str(k): v for k, v in sorted(labels.items())}, f, indent=1)
  os.replace(path + '.tmp', path)


def class_name(labels: dict[int, str], class_id: int) -> str:
  return labels.get(int(class_id), f'class {int(class_id)}')


def _find_step_dir(path: str, step: int | None
                   ) -> tuple[str, list[tuple[str, int]]]:
  """(workdir, [(checkpoint state directory, step)]) for a workdir or step
  dir: the step asked for, or with step=None every finished step, newest
  first (to fall back from a damaged one)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, checkpoints.CHECKPOINT_DIR)):
    workdir, ckpt_root = path, os.path.join(path, checkpoints.CHECKPOINT_DIR)
  elif os.path.basename(path) == checkpoints.CHECKPOINT_DIR:
    workdir, ckpt_root = os.path.dirname(path), path
  elif os.path.basename(path) == 'state' and os.path.basename(
      os.path.dirname(os.path.dirname(path))) == checkpoints.CHECKPOINT_DIR:
    return (os.path.dirname(os.path.dirname(os.path.dirname(path))),
            [(path, int(os.path.basename(os.path.dirname(path))))])
  elif os.path.basename(path).isdigit() and os.path.basename(
      os.path.dirname(path)) == checkpoints.CHECKPOINT_DIR:
    if step is not None and step != int(os.path.basename(path)):
      raise ValueError(f'{path} is step {os.path.basename(path)}, not {step}.')
    return (os.path.dirname(os.path.dirname(path)),
            [(os.path.join(path, 'state'), int(os.path.basename(path)))])
  else:
    raise FileNotFoundError(
        f'{path} is neither a training run directory (with '
        f'{checkpoints.CHECKPOINT_DIR}/ and {checkpoints.CONFIG_FILE}) nor a '
        'checkpoint step directory (WORKDIR/checkpoints/<step>).')
  steps = checkpoints.saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_root}.')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_root}; '
                            f'available steps: {steps}.')
  steps = [step] if step is not None else steps[::-1]
  return workdir, [(os.path.join(ckpt_root, str(s), 'state'), s)
                   for s in steps]


def _saved_keys(state_dir: str) -> set[str]:
  """Top-level keys of the saved TrainState that hold arrays."""
  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  keys = set()
  for k, v in dict(tree).items():
    if v is not None and jax.tree_util.tree_leaves(v):
      keys.add(k)
  return keys


def restore_variables(state_dir: str, model, config, sharding) -> dict[str, Any]:
  """Restores params, batch_stats and (when saved) ema_params only."""
  image_size = int(config.data.image_size)
  shape = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, image_size, image_size, 3)),
                         train=False))
  target = {'params': shape['params'],
            'batch_stats': shape.get('batch_stats', {})}
  try:
    keys = _saved_keys(state_dir)
  except Exception as e:  # Orbax raises many types for damaged files.
    raise checkpoints.DamagedCheckpointError(
        f'Checkpoint {os.path.dirname(state_dir)}: its metadata cannot be '
        f'read ({quiet_restore.first_line(e)})') from None
  if 'params' not in keys:
    raise ValueError(f'{state_dir} holds no params (keys {sorted(keys)}).')
  if 'ema_params' in keys:
    target['ema_params'] = shape['params']
  if 'batch_stats' not in keys:
    target.pop('batch_stats')
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      target)
  restored, error = quiet_restore.read(
      lambda: ocp.PyTreeCheckpointer().restore(
          state_dir, args=ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract),
              partial_restore=True)))
  if error is not None:
    raise checkpoints.DamagedCheckpointError(
        f'Checkpoint {os.path.dirname(state_dir)} cannot be restored into the '
        f'model of its config ({error}).')
  restored.setdefault('batch_stats', {})
  return restored


def _as_list(images) -> list[np.ndarray]:
  if isinstance(images, np.ndarray) or hasattr(images, 'shape'):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4:
      raise ValueError(f'images must be [B, H, W, 3] or a list of [H, W, 3], '
                       f'got shape {images.shape}.')
    images = list(images)
  out = []
  for i, im in enumerate(images):
    im = np.asarray(im)
    if im.ndim == 2:
      im = np.repeat(im[..., None], 3, axis=-1)
    if im.ndim != 3 or im.shape[-1] not in (3, 4) or min(im.shape[:2]) < 1:
      raise ValueError(f'Image {i} has shape {im.shape}; expected [H, W, 3] '
                       'RGB.')
    out.append(im[..., :3])
  if not out:
    raise ValueError('No images given.')
  return out


def normalize(image: jax.Array) -> jax.Array:
  """uint8 (or float) RGB pixels -> the network's input (ImageNet mean and
  standard deviation, as the input pipelines normalise)."""
  image = image.astype(jnp.float32) / 255.0
  return (image - jnp.array(contract.MEAN_RGB)) / jnp.array(
      contract.STDDEV_RGB)


def denormalize(image: np.ndarray) -> np.ndarray:
  """A normalised float image [H, W, 3] back to uint8 RGB (for drawing)."""
  pixels = (np.asarray(image, np.float32) * np.float32(contract.STDDEV_RGB) +
            np.float32(contract.MEAN_RGB)) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize_and_pad(image, new_hw, size):
  """The detection eval pipeline's resize (scale exact), normalise, pad."""
  h, w = image.shape[:2]
  scale = min(size / h, size / w)
  out = jax.image.scale_and_translate(
      image.astype(jnp.float32), (*new_hw, 3), (0, 1),
      jnp.array([scale, scale], jnp.float32), jnp.zeros(2, jnp.float32),
      method='linear', antialias=False)
  out = normalize(out)
  return jnp.pad(out, ((0, size - new_hw[0]), (0, size - new_hw[1]), (0, 0)))


@functools.partial(jax.jit, static_argnums=(1,))
def _center_crop_resize(image, size):
  """The classification eval pipeline: central crop, bilinear resize."""
  h, w = image.shape[:2]
  crop = max(int(contract.CENTER_CROP_FRACTION * min(h, w)), 1)
  oy, ox = (h - crop + 1) // 2, (w - crop + 1) // 2
  image = image[oy:oy + crop, ox:ox + crop].astype(jnp.float32)
  image = jax.image.resize(image, (size, size, 3), 'bilinear', antialias=False)
  return normalize(image)


def detection_inputs(images, size: int) -> tuple[np.ndarray, np.ndarray,
                                                  np.ndarray]:
  """Images -> (padded normalised batch [B, S, S, 3], scales [B], sizes [B, 2])."""
  batch, scales, sizes = [], [], []
  for im in _as_list(images):
    h, w = im.shape[:2]
    scale = min(size / h, size / w)
    new_hw = tuple(int(min(max(round(d * scale), 1), size)) for d in (h, w))
    batch.append(np.asarray(_resize_and_pad(im, new_hw, size)))
    scales.append(scale)
    sizes.append((h, w))
  return (np.stack(batch), np.asarray(scales, np.float32),
          np.asarray(sizes, np.int32))


@dataclasses.dataclass
class Run:
  """A trained model with its variables and config (see `load_checkpoint`).

  Attributes:
    model: the Flax module (`RetinaNet` or `Classifier`).
    variables: `{'params', 'batch_stats'}` for inference: the EMA params when
      the run kept them, else the trained params.
    config: the run's config (`WORKDIR/config.json`).
    step: the checkpoint's step.
    ema_params: the EMA params, or None when the run did not keep them.
    workdir: the run directory.
  """
  model: Any
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  step: int
  ema_params: Any = None
  workdir: str | None = None

  def __post_init__(self):
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    self._replicated = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P('data'))
    self._fns = {}
    self.labels = label_map(self.config, self.workdir)

  @property
  def is_detection(self) -> bool:
    return isinstance(self.model, models.RetinaNet)

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  # ------------------------------------------------------------- helpers

  def _jit(self, name, fn):
    if name not in self._fns:
      self._fns[name] = jax.jit(
          fn, in_shardings=(self._replicated, self._batch),
          out_shardings=self._batch)
    return self._fns[name]

  def _run(self, name, fn, batch: np.ndarray, *extra: np.ndarray):
    """Pads the batch to a multiple of the device count, runs, unpads."""
    n = len(batch)
    pad = -n % self.mesh.size
    arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a
              for a in (batch, *extra)]
    out = self._jit(name, fn)(self.variables, tuple(arrays))
    return jax.tree.map(lambda x: np.asarray(x)[:n], out)

  def _inputs(self, images) -> np.ndarray:
    if self.is_detection:
      return detection_inputs(images, self.image_size)[0]
    return np.stack([np.asarray(_center_crop_resize(im, self.image_size))
                     for im in _as_list(images)])

  # ----------------------------------------------------------------- API

  def preprocess(self, images) -> np.ndarray:
    """The normalised network inputs `[B, S, S, 3]` for uint8 RGB images."""
    return self._inputs(images)

  def features(self, images) -> dict[int, np.ndarray]:
    """Backbone feature maps {level: [B, S/2^l, S/2^l, C]} (levels 3..7).

    Images are preprocessed as for `detect` (detection runs: long side
    resized to image_size, padded) or `classify` (classification runs).
    """
    model = self.model

    def fn(variables, arrays):
      # The backbone's output, captured; XLA drops the unused head.
      _, state = model.apply(
          variables, arrays[0], train=False, mutable=['intermediates'],
          capture_intermediates=lambda m, method: (
              m.name == 'backbone' and method == '__call__'))
      return state['intermediates']['backbone']['__call__'][0]

    return self._run('features', fn, self._inputs(images))

  def detect(self, images, score_threshold: float | None = None,
             max_detections: int | None = None) -> dict[str, np.ndarray]:
    """Detections in each image's own pixels.

    Args:
      images: uint8 RGB `[B, H, W, 3]`, or a list of `[H, W, 3]` arrays of
        any sizes.
      score_threshold, max_detections: default to the run's `config.eval`.

    Returns:
      dict of `boxes [B, D, 4]` (ymin, xmin, ymax, xmax) in input-image
      pixels, `scores [B, D]`, `classes [B, D]` (ids >= 1; 0 past the end),
      `num_detections [B]`; sorted by score, entries past `num_detections`
      are zero.
    """
    if not self.is_detection:
      raise ValueError('detect() needs a detection (retinanet) run; this one '
                       f'is {self.config.task!r}: use classify().')
    ec = self.config.eval
    thr = ec.score_threshold if score_threshold is None else score_threshold
    max_det = ec.max_detections if max_detections is None else max_detections
    batch, scales, sizes = detection_inputs(images, self.image_size)
    anchors = self.model.anchors(self.image_size)
    model = self.model

    def fn(variables, arrays):
      image, window = arrays
      out = model.apply(variables, image, train=False)
      return postprocess.detect(
          out['cls_outputs'], out['box_outputs'], anchors, window,
          pre_nms_top_k=ec.pre_nms_top_k, score_threshold=thr,
          iou_threshold=ec.iou_threshold, max_detections=max_det)

    window = np.round(sizes * scales[:, None]).astype(np.float32)
    det = self._run(f'detect_{thr}_{max_det}', fn, batch, window)
    det['boxes'] = det['boxes'] / scales[:, None, None]
    det['boxes'] = np.minimum(det['boxes'],
                              np.tile(sizes[:, None, :], (1, 1, 2)))
    return det

  def classify(self, images, k: int = 5) -> dict[str, Any]:
    """Top-k classes: `classes [B, k]`, `probabilities [B, k]`, `labels`
    (names, a list of B lists of k)."""
    if self.is_detection:
      raise ValueError('classify() needs a classification run; this one is '
                       'a detection run: use detect().')
    model = self.model

    def fn(variables, arrays):
      return jax.nn.softmax(model.apply(variables, arrays[0], train=False))

    probs = self._run('classify', fn, self._inputs(images))
    k = min(k, probs.shape[-1])
    top = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    return {'classes': top,
            'probabilities': np.take_along_axis(probs, top, -1),
            'labels': [[class_name(self.labels, c) for c in row]
                       for row in top]}


def load_checkpoint(workdir_or_checkpoint_path: str,
                    step: int | None = None) -> Run:
  """Loads a training run for inference.

  Args:
    workdir_or_checkpoint_path: a run directory (with `config.json` and
      `checkpoints/`), or one step's directory `WORKDIR/checkpoints/<step>`.
    step: the step to load (default: the newest one that restores; a damaged
      newer step is skipped with a warning, and never moved).

  Returns:
    A `Run` with `.model`, `.variables` (EMA weights when kept), `.config`,
    `.step` and `.features`, `.detect`, `.classify`.
  """
  workdir, candidates = _find_step_dir(workdir_or_checkpoint_path, step)
  config = checkpoints.load_config(workdir)
  model = models.build_model(config)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('data',))
  for i, (state_dir, step) in enumerate(candidates):
    try:
      restored = restore_variables(state_dir, model, config,
                                   NamedSharding(mesh, P()))
      break
    except checkpoints.DamagedCheckpointError as e:
      if i + 1 == len(candidates):
        raise
      warnings.warn(f'checkpoint {step} of {workdir} is damaged; loading '
                    f'step {candidates[i + 1][1]} instead: {e}')
  ema = restored.get('ema_params')
  variables = {'params': restored['params'] if ema is None else ema,
               'batch_stats': restored['batch_stats']}
  return Run(model=model, variables=variables, config=config, step=step,
             ema_params=ema, workdir=workdir)
