"""Training metrics to the console, `metrics.jsonl` and TensorBoard."""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
  """Console, `WORKDIR/metrics.jsonl` and `WORKDIR/tb`; only process 0 writes."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf  # Only for its event-file writer.
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Appends one record of scalars at `step`."""
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    with self._tb.as_default():
      for k, v in metrics.items():
        self._tf.summary.scalar(k, float(v), step=int(step))
    self._tb.flush()

  def images(self, step: int, name: str, images: list) -> None:
    """uint8 [H, W, 3] images to TensorBoard (padded to one size)."""
    if not self.active or not images:
      return
    import numpy as np  # pylint: disable=g-import-not-at-top
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    batch = np.zeros([len(images), h, w, 3], np.uint8)
    for k, im in enumerate(images):
      batch[k, :im.shape[0], :im.shape[1]] = im
    with self._tb.as_default():
      self._tf.summary.image(name, batch, step=int(step),
                             max_outputs=len(images))
    self._tb.flush()

  def print(self, message: str) -> None:
    if self.active:
      print(message, flush=True)
