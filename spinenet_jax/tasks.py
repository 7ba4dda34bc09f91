"""What differs between training a detector and a classifier: one record each.

A task holds the model and config of a run and gives the trainer its loss,
its evaluation step, how evaluation batches are reduced to metrics, how the
metrics are reported, and which input pipeline (`data`) feeds it. The
trainer (`train_lib`) calls only these, so a new task is a new class here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from input_pipeline import classification as classification_data
from input_pipeline import detection as detection_data
from input_pipeline import sources
from spinenet_jax import draw
from spinenet_jax import evaluation
from spinenet_jax import inference
from spinenet_jax import models
from spinenet_jax import sharding
from spinenet_jax.detection import losses
from spinenet_jax.detection import postprocess
from spinenet_jax.detection import targets as targets_lib

Batch = dict[str, jax.Array]
# The eval batch entries the device needs (the rest stay on the host).
DEVICE_EVAL_KEYS = ('image', 'orig_size', 'scale', 'label', 'mask')


def _device_batch(local: dict[str, np.ndarray], mesh) -> Batch:
  return sharding.global_batch(
      {k: v for k, v in local.items() if k in DEVICE_EVAL_KEYS}, mesh)


def _apply_train(model, variables, batch: Batch, rng):
  """The model in training mode: (outputs, updated batch statistics)."""
  outputs, updates = model.apply(
      variables, batch['image'], train=True, mutable=['batch_stats'],
      rngs={'dropout': rng})
  return outputs, updates['batch_stats']


@dataclasses.dataclass(frozen=True)
class Detection:
  """RetinaNet: focal and Huber losses on anchors matched on device; COCO AP."""
  model: models.RetinaNet
  config: ml_collections.ConfigDict
  data = detection_data  # The input pipeline (train_iterator, eval_iterator).
  eval_outputs_batched = True  # Detections stay sharded on the batch axis.

  @functools.cached_property
  def anchors(self) -> np.ndarray:
    return self.model.anchors(self.config.data.image_size)

  def loss(self, variables, batch: Batch, rng):
    """(loss, (metrics, batch_stats)) of one training batch."""
    outputs, batch_stats = _apply_train(self.model, variables, batch, rng)
    targets = targets_lib.assign_batch(self.anchors, batch['boxes'],
                                       batch['classes'], batch.get('is_crowd'))
    lc = self.config.loss
    total, parts = losses.retinanet_loss(
        outputs, targets, box_loss_weight=lc.box_loss_weight,
        alpha=lc.focal_alpha, gamma=lc.focal_gamma, delta=lc.huber_delta)
    metrics = {k: parts[k] for k in ('cls_loss', 'box_loss', 'num_positives')}
    return total, (metrics, batch_stats)

  def eval_step(self, variables, batch: Batch) -> dict[str, jax.Array]:
    """Detections (boxes in the resized image's pixels) of one eval batch."""
    out = self.model.apply(variables, batch['image'], train=False)
    window = jnp.round(batch['orig_size'] * batch['scale'][:, None])
    ec = self.config.eval
    return postprocess.detect(
        out['cls_outputs'], out['box_outputs'], self.anchors, window,
        pre_nms_top_k=ec.pre_nms_top_k, score_threshold=ec.score_threshold,
        iou_threshold=ec.iou_threshold, max_detections=ec.max_detections)

  def evaluate(self, eval_step, variables,
               batches: Iterator[dict[str, np.ndarray]], mesh,
               results_path: str | None = None,
               image_sink: Any = None) -> dict[str, float]:
    """COCO metrics over one pass of the (process-local) eval batches, with
    AP per class; in the user's ids for user data (`input_pipeline.
    sources`: against their eval JSON), detections written to
    `results_path` as a COCO results JSON when given, and the first
    `config.eval.num_images_to_draw` images drawn (`_draw`) passed to
    `image_sink`."""
    evaluator, pictures = evaluation.CocoEvaluator(), []
    for local in batches:
      out = eval_step(variables, _device_batch(local, mesh))
      det = {k: sharding.to_local(v) for k, v in out.items()}
      if len(pictures) < self.config.eval.get('num_images_to_draw', 0):
        pictures += self._draw(local, det)
      det['boxes'] = det['boxes'] / local['scale'][:, None, None]
      evaluator.add(det, {
          'image_id': local['image_id'], 'boxes': local['gt_boxes'],
          'classes': local['gt_classes'], 'is_crowd': local['gt_is_crowd'],
          'height': local['orig_size'][:, 0],
          'width': local['orig_size'][:, 1],
      }, mask=local['mask'])
    if image_sink is not None:
      image_sink(pictures[:self.config.eval.get('num_images_to_draw', 0)])
    meta = sources.dataset_meta(self.config.data) or {}
    return evaluator.result(
        user_ids=meta.get('category_ids'),
        groundtruth_json=meta.get('eval_annotations'),
        results_path=results_path, names=inference.label_map(self.config))

  def _draw(self, local: dict[str, np.ndarray], det: dict[str, np.ndarray]
            ) -> list[np.ndarray]:
    """Ground truth (left) beside the predictions scoring at least
    `config.eval.draw_min_score` (right), on the resized eval images."""
    labels = inference.label_map(self.config)
    minimum = self.config.eval.get('draw_min_score', 0.3)
    out = []
    for i in np.nonzero(local['mask'])[0]:
      h, w = np.round(local['orig_size'][i] * local['scale'][i]).astype(int)
      image = inference.denormalize(local['image'][i])[:h, :w]
      truth = [{'box': b * local['scale'][i], 'class': int(c), 'score': 1.0,
                'label': inference.class_name(labels, c)}
               for b, c in zip(local['gt_boxes'][i], local['gt_classes'][i])
               if c > 0]
      pred = [{'box': det['boxes'][i, j], 'class': int(det['classes'][i, j]),
               'score': float(det['scores'][i, j]),
               'label': inference.class_name(labels, det['classes'][i, j])}
              for j in range(int(det['num_detections'][i]))
              if det['scores'][i, j] >= minimum]
      out.append(np.concatenate([np.asarray(draw.draw_detections(
          image, boxes)) for boxes in (truth, pred)], axis=1))
    return out

  def report(self, metrics: dict[str, float]) -> str:
    per_class = evaluation.format_per_class(metrics)
    return evaluation.format_coco(metrics) + (
        '\n' + per_class if per_class else '')


@dataclasses.dataclass(frozen=True)
class Classification:
  """A classifier: softmax cross-entropy (optionally smoothed); top-1/top-5."""
  model: models.Classifier
  config: ml_collections.ConfigDict
  data = classification_data
  eval_outputs_batched = False  # Eval steps return global sums.

  def loss(self, variables, batch: Batch, rng):
    """(loss, (metrics, batch_stats)) of one training batch."""
    logits, batch_stats = _apply_train(self.model, variables, batch, rng)
    labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
    if self.config.loss.label_smoothing:
      labels = optax.smooth_labels(labels, self.config.loss.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, labels).mean()
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, ({'train_top1': top1}, batch_stats)

  def eval_step(self, variables, batch: Batch) -> dict[str, jax.Array]:
    """Correct top-1 / top-5 counts and the example count of a batch."""
    logits = self.model.apply(variables, batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    correct = lambda k: jnp.sum(
        evaluation.topk_correct(logits, batch['label'], k) * mask)
    return {'top1': correct(1), 'top5': correct(5), 'count': jnp.sum(mask)}

  def evaluate(self, eval_step, variables,
               batches: Iterator[dict[str, np.ndarray]], mesh,
               results_path: str | None = None,
               image_sink: Any = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy over one pass of the eval batches
    (`results_path`, `image_sink`: detection only)."""
    del results_path, image_sink
    totals = {'top1': 0.0, 'top5': 0.0, 'count': 0.0}
    for local in batches:
      out = jax.device_get(eval_step(variables, _device_batch(local, mesh)))
      totals = {k: totals[k] + float(out[k]) for k in totals}
    count = max(totals['count'], 1.0)
    return {'top1': totals['top1'] / count, 'top5': totals['top5'] / count}

  def report(self, metrics: dict[str, float]) -> str:
    return f'  top-1 {metrics["top1"]:.4f}  top-5 {metrics["top5"]:.4f}'


TASKS = {'retinanet': Detection, 'classification': Classification}


def get_task(config: ml_collections.ConfigDict,
             model: Any) -> Detection | Classification:
  """The task record of `config.task` for `model`."""
  if config.task not in TASKS:
    raise ValueError(f'Unknown task {config.task!r} (config.task); expected '
                     f'one of {sorted(TASKS)}.')
  return TASKS[config.task](model, config)
