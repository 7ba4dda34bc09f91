"""RetinaNet losses (Model Garden `FocalLoss`, Keras `Huber`, RetinaNet task).

Both losses are sums normalised by `num_positives = sum(box_weights) + 1`
taken over the whole (global) batch. Inside `jax.jit` with the batch sharded
over devices, `jnp.sum` over the batch axis already is the global sum, so no
collective is written here. Losses are computed in float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from spinenet_jax.detection import outputs as outputs_lib

Array = jnp.ndarray


def flatten_outputs(outputs: Mapping[str, Mapping[Any, Array]],
                    num_classes: int | None = None) -> tuple[Array, Array]:
  """The head's outputs as `cls [B, N, num_classes]` and `box [B, N, 4]`.

  `outputs` is `{'cls_outputs': {level: [B, H, W, A * num_classes]},
  'box_outputs': {level: [B, H, W, A * 4]}}`; rows are in anchor order
  (`outputs.flatten_levels`), levels concatenated in increasing order.
  """
  cls, box = outputs_lib.flatten_levels(
      outputs['cls_outputs'], outputs['box_outputs'], num_classes)
  return jnp.concatenate(cls, axis=1), jnp.concatenate(box, axis=1)


def focal_loss(logits: Array, cls_targets: Array, cls_weights: Array,
               normalizer: Array, alpha: float = 0.25,
               gamma: float = 1.5) -> Array:
  """Sigmoid focal loss summed over anchors and classes, / `normalizer`.

  Args:
    logits: `[..., N, C]` class logits (column 0 is background).
    cls_targets: `[..., N]` int, class id for positives, -1 otherwise; the
      target is `one_hot(cls_targets, C)`, so column 0 is never positive.
    cls_weights: `[..., N]` per-anchor weights (0 for ignored anchors).
    normalizer: scalar, e.g. the number of positives + 1.
    alpha: weight of positive targets (`1 - alpha` for negatives).
    gamma: focusing exponent of `(1 - p_t)`.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  y = jax.nn.one_hot(cls_targets, num_classes, dtype=jnp.bool_)
  # s = -z for positive labels, z for negative ones: CE = softplus(s) and
  # 1 - p_t = sigmoid(s), both numerically stable.
  s = jnp.where(y, -logits, logits)
  loss = jnp.exp(gamma * jax.nn.log_sigmoid(s)) * jax.nn.softplus(s)
  loss = loss * jnp.where(y, alpha, 1.0 - alpha)
  loss = loss * cls_weights.astype(jnp.float32)[..., None]
  return jnp.sum(loss) / normalizer


def huber(x: Array, delta: float) -> Array:
  """Elementwise Huber loss (Keras form): `0.5 x^2` or `delta (|x| - delta/2)`."""
  a = jnp.abs(x)
  quadratic = jnp.minimum(a, delta)
  return 0.5 * quadratic**2 + delta * (a - quadratic)


def box_loss(box_outputs: Array, box_targets: Array, box_weights: Array,
             normalizer: Array, delta: float = 0.1) -> Array:
  """Huber loss averaged over the 4 coordinates, weighted sum / `normalizer`.

  Args:
    box_outputs: `[..., N, 4]` predicted (dy, dx, dh, dw).
    box_targets: `[..., N, 4]` encoded targets.
    box_weights: `[..., N]`, 1 for positive anchors.
    normalizer: scalar, e.g. the number of positives + 1.
    delta: Huber threshold.
  """
  diff = box_outputs.astype(jnp.float32) - box_targets.astype(jnp.float32)
  loss = jnp.mean(huber(diff, delta), axis=-1)
  return jnp.sum(loss * box_weights.astype(jnp.float32)) / normalizer


def retinanet_loss(outputs: Mapping[str, Mapping[Any, Array]],
                   targets: Mapping[str, Array], box_loss_weight: float = 50.0,
                   alpha: float = 0.25, gamma: float = 1.5,
                   delta: float = 0.1) -> tuple[Array, dict[str, Array]]:
  """RetinaNet loss `cls + box_loss_weight * box` (without weight decay).

  Args:
    outputs: the RetinaNet model output (see `flatten_outputs`).
    targets: `targets.assign_batch` output: `cls_targets [B, N]`,
      `box_targets [B, N, 4]`, `cls_weights [B, N]`, `box_weights [B, N]`.
    box_loss_weight: multiplier of the box loss.
    alpha, gamma: focal loss parameters.
    delta: Huber threshold.

  Returns:
    `(total, {'cls_loss', 'box_loss', 'num_positives'})`, where
    `num_positives` is the normaliser `sum(box_weights) + 1`.
  """
  # Level by level against the matching slice of the targets, not on the
  # levels concatenated: with the image height sharded over the `model` mesh
  # axis each level's anchors are split over the devices in their own blocks,
  # and concatenating them made XLA re-shard every level with all-to-alls.
  cls, box = outputs_lib.flatten_levels(outputs['cls_outputs'],
                                        outputs['box_outputs'])
  shape = (cls[0].shape[0], sum(c.shape[1] for c in cls))
  if shape != targets['cls_targets'].shape:
    raise ValueError(f'outputs give {shape} [batch, anchors] but '
                     f'cls_targets has shape {targets["cls_targets"].shape}')
  num_positives = jnp.sum(targets['box_weights'].astype(jnp.float32)) + 1.0
  cls_l = box_l = jnp.zeros((), jnp.float32)
  start = 0
  for c, b in zip(cls, box):
    t = {k: v[:, start:start + c.shape[1]] for k, v in targets.items()}
    start += c.shape[1]
    cls_l += focal_loss(c, t['cls_targets'], t['cls_weights'], num_positives,
                        alpha, gamma)
    box_l += box_loss(b, t['box_targets'], t['box_weights'], num_positives,
                      delta)
  total = cls_l + box_loss_weight * box_l
  return total, {'cls_loss': cls_l, 'box_loss': box_l,
                 'num_positives': num_positives}
