"""Detection tests: each JAX function against a plain NumPy version."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spinenet_jax.detection import anchors as anchors_lib
from spinenet_jax.detection import box_ops
from spinenet_jax.detection import losses
from spinenet_jax.detection import postprocess
from spinenet_jax.detection import targets

ASPECTS = (0.5, 1.0, 2.0)


# ----------------------------------------------------------------- references
def np_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = ih * iw
      union = ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])
               - inter)
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def np_encode(box, anchor):
  h, w = box[2] - box[0], box[3] - box[1]
  ha, wa = anchor[2] - anchor[0], anchor[3] - anchor[1]
  return np.array([(box[0] + h / 2 - anchor[0] - ha / 2) / ha,
                   (box[1] + w / 2 - anchor[1] - wa / 2) / wa,
                   math.log(h / ha), math.log(w / wa)])


def np_assign(anchors, boxes, classes, crowd, pos_thr=0.5, neg_thr=0.5):
  """Model Garden's labeler written as loops over plain arrays."""
  keep = [j for j in range(len(boxes)) if classes[j] > 0 and not crowd[j]]
  n = len(anchors)
  cls_t = np.full(n, -1)
  box_t = np.zeros((n, 4))
  cls_w = np.ones(n)
  box_w = np.zeros(n)
  if not keep:
    return cls_t, box_t, cls_w, box_w
  iou = np_iou(anchors, boxes[keep])
  match = {}
  for i in range(n):
    j = int(np.argmax(iou[i]))
    if iou[i, j] >= pos_thr:
      match[i] = j
    elif iou[i, j] >= neg_thr:
      cls_w[i] = 0.0
  for j in reversed(range(len(keep))):  # lowest GT index wins
    i = int(np.argmax(iou[:, j]))
    match[i] = j
    cls_w[i] = 1.0
  for i, j in match.items():
    cls_t[i] = classes[keep[j]]
    box_t[i] = np_encode(boxes[keep[j]], anchors[i])
    box_w[i] = 1.0
  return cls_t, box_t, cls_w, box_w


def np_greedy_nms(boxes, classes, max_out, thr):
  kept = []
  for i in range(len(boxes)):
    if len(kept) == max_out:
      break
    if all(classes[k] != classes[i] or
           np_iou(boxes[k:k + 1], boxes[i:i + 1])[0, 0] <= thr for k in kept):
      kept.append(i)
  return kept


def np_detect(logits, deltas, anchors, size, top_k, score_thr, iou_thr, max_det):
  scores = 1 / (1 + np.exp(-logits[:, 1:].astype(np.float64)))
  a, c = np.unravel_index(np.argsort(-scores, axis=None, kind='stable'),
                          scores.shape)
  a, c = a[:top_k], c[:top_k]
  s = scores[a, c]
  a, c, s = a[s > score_thr], c[s > score_thr], s[s > score_thr]
  boxes = []
  for i in a:
    d, an = deltas[i], anchors[i]
    ha, wa = an[2] - an[0], an[3] - an[1]
    yc, xc = an[0] + ha / 2 + d[0] * ha, an[1] + wa / 2 + d[1] * wa
    h = math.exp(min(d[2], math.log(1000 / 16))) * ha
    w = math.exp(min(d[3], math.log(1000 / 16))) * wa
    boxes.append([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2])
  boxes = np.clip(np.array(boxes).reshape(-1, 4), 0, size)
  kept = np_greedy_nms(boxes, c, max_det, iou_thr)
  return boxes[kept], s[kept], c[kept] + 1


def random_boxes(rng, n, size, min_side=4.0):
  yx = rng.uniform(0, size - min_side, (n, 2))
  hw = rng.uniform(min_side, size / 2, (n, 2))
  return np.concatenate([yx, np.minimum(yx + hw, size)], 1).astype(np.float32)


def fake_outputs(rng, image_size, num_classes, batch, num_anchors=9, scale=1.0):
  sizes = anchors_lib.feature_sizes(image_size)
  return {
      'cls_outputs': {l: jnp.asarray(scale * rng.normal(
          size=(batch, h, w, num_anchors * num_classes)), jnp.float32)
                      for l, (h, w) in sizes.items()},
      'box_outputs': {l: jnp.asarray(0.2 * rng.normal(
          size=(batch, h, w, num_anchors * 4)), jnp.float32)
                      for l, (h, w) in sizes.items()},
  }


# -------------------------------------------------------------------- anchors
def test_anchor_count_640():
  a = anchors_lib.multilevel_anchors(640)
  assert a.shape == (76725, 4) and a.dtype == np.float32


@pytest.mark.parametrize('image_size', [256, (128, 384)])
def test_anchors_per_level_first_last(image_size):
  h, w = anchors_lib.image_hw(image_size)
  a = anchors_lib.multilevel_anchors(image_size)
  start = 0
  for level in range(3, 8):
    stride = 2**level
    n = (h // stride) * (w // stride) * 9
    block = a[start:start + n]
    start += n
    # First anchor: centre (stride/2, stride/2), scale 0, ratio 0.5.
    base = 3.0 * stride
    hh, hw = base / math.sqrt(0.5) / 2, base * math.sqrt(0.5) / 2
    c = stride / 2
    np.testing.assert_allclose(block[0], [c - hh, c - hw, c + hh, c + hw],
                               rtol=1e-6)
    # Last anchor: last centre, scale 2, ratio 2.0.
    base = 3.0 * stride * 2**(2 / 3)
    hh, hw = base / math.sqrt(2.0) / 2, base * math.sqrt(2.0) / 2
    cy, cx = h - stride / 2, w - stride / 2
    np.testing.assert_allclose(block[-1], [cy - hh, cx - hw, cy + hh, cx + hw],
                               rtol=1e-6)
  assert start == len(a)


def test_anchor_order_matches_head_layout():
  """Anchor (y, x, a) at channel a*4+k of the head lands at the same row."""
  size = (128, 256)
  a = anchors_lib.multilevel_anchors(size)
  box_out, cls_out = {}, {}
  for level, (h, w) in anchors_lib.feature_sizes(size).items():
    stride = 2**level
    grid = np.zeros((1, h, w, 9 * 4), np.float32)
    for y in range(h):
      for x in range(w):
        for s in range(3):
          for r, ratio in enumerate(ASPECTS):
            base = 3.0 * stride * 2**(s / 3)
            hh, hw = base / math.sqrt(ratio) / 2, base * math.sqrt(ratio) / 2
            cy, cx = stride / 2 + y * stride, stride / 2 + x * stride
            k = (s * 3 + r) * 4
            grid[0, y, x, k:k + 4] = [cy - hh, cx - hw, cy + hh, cx + hw]
    box_out[level] = grid
    cls_out[level] = np.zeros((1, h, w, 9 * 2), np.float32)
  _, flat = losses.flatten_outputs({'cls_outputs': cls_out,
                                    'box_outputs': box_out})
  np.testing.assert_allclose(np.asarray(flat[0]), a, rtol=1e-6)


def test_anchor_bad_size():
  with pytest.raises(ValueError, match='divisible'):
    anchors_lib.multilevel_anchors(200)
  with pytest.raises(ValueError, match='image_size'):
    anchors_lib.multilevel_anchors((128, 128, 3))


# ------------------------------------------------------------------ box ops
def test_iou_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 20, 100), random_boxes(rng, 7, 100)
  b[0] = a[0]
  np.testing.assert_allclose(box_ops.iou(a, b), np_iou(a, b), atol=1e-6)
  assert float(box_ops.iou(a, b)[0, 0]) == pytest.approx(1.0)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(1)
  anchors = random_boxes(rng, 50, 256)
  boxes = random_boxes(rng, 50, 256)
  deltas = box_ops.encode(boxes, anchors)
  ref = np.stack([np_encode(b, a) for b, a in zip(boxes, anchors)])
  np.testing.assert_allclose(deltas, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(box_ops.decode(deltas, anchors), boxes,
                             rtol=1e-4, atol=1e-3)


def test_decode_clips_log_size():
  anchor = np.array([[0.0, 0.0, 16.0, 16.0]], np.float32)
  out = box_ops.decode(np.array([[0.0, 0.0, 20.0, 20.0]], np.float32), anchor)
  np.testing.assert_allclose(out, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]],
                             rtol=1e-5)


# ---------------------------------------------------------------- targets
def _random_gt(rng, batch, max_instances, size):
  boxes = np.stack([random_boxes(rng, max_instances, size, min_side=6.0)
                    for _ in range(batch)])
  classes = rng.integers(1, 91, (batch, max_instances)).astype(np.int32)
  crowd = rng.random((batch, max_instances)) < 0.15
  for b in range(batch):  # padding at the end, class -1 and zero boxes
    n = rng.integers(0, max_instances + 1)
    classes[b, n:] = -1
    boxes[b, n:] = 0.0
  return boxes, classes, crowd


def _check_assign(out, ref):
  cls_t, box_t, cls_w, box_w = ref
  np.testing.assert_array_equal(np.asarray(out['cls_targets']), cls_t)
  np.testing.assert_array_equal(np.asarray(out['cls_weights']), cls_w)
  np.testing.assert_array_equal(np.asarray(out['box_weights']), box_w)
  np.testing.assert_allclose(np.asarray(out['box_targets']), box_t, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('matcher', ['dense', 'scan'])
def test_assign_matches_numpy(matcher):
  rng = np.random.default_rng(2)
  size = 128
  anchors = anchors_lib.multilevel_anchors(size)
  boxes, classes, crowd = _random_gt(rng, 4, 6, size)
  fn = jax.jit(functools.partial(targets.assign, matcher=matcher))
  for b in range(4):
    out = fn(anchors, boxes[b], classes[b], crowd[b])
    _check_assign(out, np_assign(anchors, boxes[b], classes[b], crowd[b]))


def test_assign_matchers_agree_on_ties():
  """The CPU scan and the dense matrix label identically, ties included:
  duplicate boxes (an anchor's best IoU reached by two rows: the first row
  wins) and boxes whose best anchor is shared."""
  rng = np.random.default_rng(5)
  anchors = anchors_lib.multilevel_anchors(128)
  boxes, classes, crowd = _random_gt(rng, 3, 12, 128)
  classes[classes > 0] = 9
  boxes[:, 1] = boxes[:, 0]  # a duplicate of row 0 with another class
  classes[:, :2] = [[3, 4]]
  boxes[:, 2] = anchors[100]  # exactly an anchor: IoU 1
  classes[:, 2] = 5
  crowd[:, :3] = False
  dense, scan = (targets.assign_batch(anchors, boxes, classes, crowd,
                                      matcher=m) for m in ('dense', 'scan'))
  for key in dense:
    np.testing.assert_array_equal(np.asarray(scan[key]),
                                  np.asarray(dense[key]), err_msg=key)
  cls_targets = np.asarray(dense['cls_targets'])
  assert (cls_targets == 3).sum() > 0 and (cls_targets == 4).sum() == 0
  assert (cls_targets[:, 100] == 5).all()
  with pytest.raises(ValueError, match='matcher'):
    targets.assign(anchors, boxes[0], classes[0], matcher='loop')


def test_assign_ignore_band():
  rng = np.random.default_rng(3)
  anchors = anchors_lib.multilevel_anchors(128)
  boxes, classes, crowd = _random_gt(rng, 1, 5, 128)
  classes[0, :3] = [3, 4, 5]
  boxes[0, :3] = random_boxes(rng, 3, 128, min_side=10.0)
  out = targets.assign(anchors, boxes[0], classes[0], crowd[0],
                       match_threshold=0.6, unmatched_threshold=0.3)
  ref = np_assign(anchors, boxes[0], classes[0], crowd[0], 0.6, 0.3)
  assert (ref[2] == 0).sum() > 0  # the band does ignore some anchors
  _check_assign(out, ref)


def test_assign_forced_match_crowd_and_padding():
  anchors = anchors_lib.multilevel_anchors(128)
  # A thin box overlaps every anchor with IoU < 0.5: only a forced match.
  boxes = np.array([[10, 10, 12, 60], [0, 0, 128, 128], [40, 40, 80, 80],
                    [0, 0, 0, 0]], np.float32)
  classes = np.array([7, 9, 11, -1], np.int32)
  crowd = np.array([False, False, True, False])
  iou = np_iou(anchors, boxes[:1])[:, 0]
  assert iou.max() < 0.5
  out = targets.assign(anchors, boxes, classes, crowd)
  cls_t = np.asarray(out['cls_targets'])
  assert np.flatnonzero(cls_t == 7).tolist() == [int(np.argmax(iou))]
  assert (cls_t == 11).sum() == 0  # crowd box: no positives
  assert (cls_t == 9).sum() >= 1
  assert set(np.unique(cls_t)) <= {-1, 7, 9}
  np.testing.assert_array_equal(np.asarray(out['cls_weights']), 1.0)
  # Only padding: every anchor negative.
  out = targets.assign(anchors, boxes[3:], classes[3:])
  assert (np.asarray(out['cls_targets']) == -1).all()
  assert float(out['box_weights'].sum()) == 0.0


def test_assign_batch_vmap_and_errors():
  rng = np.random.default_rng(4)
  anchors = anchors_lib.multilevel_anchors(128)
  boxes, classes, crowd = _random_gt(rng, 3, 4, 128)
  out = targets.assign_batch(anchors, boxes, classes, crowd)
  assert out['cls_targets'].shape == (3, len(anchors))
  assert out['box_targets'].shape == (3, len(anchors), 4)
  for b in range(3):
    _check_assign({k: v[b] for k, v in out.items()},
                  np_assign(anchors, boxes[b], classes[b], crowd[b]))
  with pytest.raises(ValueError, match='assign_batch'):
    targets.assign(anchors, boxes, classes)
  with pytest.raises(ValueError, match='unmatched_threshold'):
    targets.assign(anchors, boxes[0], classes[0], match_threshold=0.4)


# ------------------------------------------------------------------ losses
def np_focal(logits, cls_t, cls_w, norm, alpha=0.25, gamma=1.5):
  total = 0.0
  for idx in np.ndindex(*logits.shape):
    z = float(logits[idx])
    y = 1.0 if cls_t[idx[:-1]] == idx[-1] else 0.0
    p = 1 / (1 + math.exp(-z))
    ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    pt = p if y else 1 - p
    total += cls_w[idx[:-1]] * (alpha if y else 1 - alpha) * (1 - pt)**gamma * ce
  return total / norm


def np_box_loss(pred, target, weights, norm, delta=0.1):
  total = 0.0
  for idx in np.ndindex(*pred.shape[:-1]):
    per = []
    for k in range(4):
      x = abs(float(pred[idx][k] - target[idx][k]))
      per.append(0.5 * x * x if x <= delta else delta * x - 0.5 * delta**2)
    total += weights[idx] * sum(per) / 4
  return total / norm


def test_losses_match_numpy():
  rng = np.random.default_rng(5)
  b, n, c = 2, 30, 5
  logits = rng.normal(size=(b, n, c)).astype(np.float32) * 3
  cls_t = np.where(rng.random((b, n)) < 0.3, rng.integers(1, c, (b, n)), -1)
  cls_w = (rng.random((b, n)) < 0.9).astype(np.float32)
  box_w = (cls_t > 0).astype(np.float32)
  pred = rng.normal(size=(b, n, 4)).astype(np.float32) * 0.2
  target = rng.normal(size=(b, n, 4)).astype(np.float32) * 0.2
  norm = box_w.sum() + 1
  np.testing.assert_allclose(
      losses.focal_loss(logits, cls_t, cls_w, norm),
      np_focal(logits, cls_t, cls_w, norm), rtol=1e-5)
  np.testing.assert_allclose(
      losses.box_loss(pred, target, box_w, norm),
      np_box_loss(pred, target, box_w, norm), rtol=1e-5)
  # Gradients stay finite for confident logits.
  g = jax.grad(losses.focal_loss)(jnp.full((1, 2, c), 40.0), cls_t[:1, :2],
                                  cls_w[:1, :2], 1.0)
  assert np.isfinite(np.asarray(g)).all()


def test_retinanet_loss_and_flatten():
  rng = np.random.default_rng(6)
  size, c = 128, 4
  outputs = fake_outputs(rng, size, c, batch=2)
  anchors = anchors_lib.multilevel_anchors(size)
  boxes, classes, crowd = _random_gt(rng, 2, 5, size)
  classes = np.where(classes > 0, classes % (c - 1) + 1, -1)
  t = targets.assign_batch(anchors, boxes, classes, crowd)
  total, parts = jax.jit(losses.retinanet_loss)(outputs, t)
  cls, box = losses.flatten_outputs(outputs)
  assert cls.shape == (2, len(anchors), c) and box.shape == (2, len(anchors), 4)
  # Level 3, pixel (1, 2), anchor 4, class 3 is row (1*16+2)*9+4, column 3.
  np.testing.assert_array_equal(cls[1, (1 * 16 + 2) * 9 + 4, 3],
                                outputs['cls_outputs'][3][1, 1, 2, 4 * c + 3])
  norm = float(t['box_weights'].sum()) + 1
  assert float(parts['num_positives']) == norm
  ref_cls = np_focal(np.asarray(cls), np.asarray(t['cls_targets']),
                     np.asarray(t['cls_weights']), norm)
  ref_box = np_box_loss(np.asarray(box), np.asarray(t['box_targets']),
                        np.asarray(t['box_weights']), norm)
  np.testing.assert_allclose(parts['cls_loss'], ref_cls, rtol=1e-4)
  np.testing.assert_allclose(parts['box_loss'], ref_box, rtol=1e-4)
  np.testing.assert_allclose(total, ref_cls + 50 * ref_box, rtol=1e-4)


# ------------------------------------------------------------ post-processing
def test_nms_matches_greedy_numpy():
  rng = np.random.default_rng(7)
  # Clustered boxes of 3 classes so that suppression chains cross tiles.
  centres = rng.uniform(20, 100, (6, 2))
  pick = rng.integers(0, 6, 300)
  yx = centres[pick] + rng.normal(0, 4, (300, 2))
  hw = rng.uniform(15, 30, (300, 2))
  boxes = np.concatenate([yx - hw / 2, yx + hw / 2], 1).astype(np.float32)
  classes = rng.integers(1, 4, 300).astype(np.int32)
  valid = np.arange(300) < 280
  for max_out, tile in ((100, 32), (10, 64), (100, 300)):
    idx, count = jax.jit(postprocess.nms, static_argnums=(3, 4, 5))(
        boxes, classes, valid, max_out, 0.5, tile)
    ref = np_greedy_nms(boxes[:280], classes[:280], max_out, 0.5)
    assert int(count) == len(ref)
    np.testing.assert_array_equal(np.asarray(idx)[:len(ref)], ref)
    assert (np.asarray(idx)[len(ref):] == -1).all()


@pytest.mark.parametrize('c,scale,offset,top_k,tile,vectorize', [
    (6, 1.0, 0.0, 400, 64, False),  # many candidates, cut by pre_nms_top_k
    (6, 4.0, -9.0, 3000, 64, True),  # ~1000 candidates over many tiles
    (6, 4.0, -14.0, 5000, 256, False),  # few candidates: fewer than 100 kept
    (2, 4.0, -6.0, 2000, 128, None),  # one class: heavy suppression
])
def test_detect_matches_numpy(c, scale, offset, top_k, tile, vectorize):
  rng = np.random.default_rng(8)
  size, batch = 128, 2
  outputs = fake_outputs(rng, size, c, batch, scale=scale)
  for l in outputs['cls_outputs']:
    outputs['cls_outputs'][l] += offset
  anchors = anchors_lib.multilevel_anchors(size)
  det = jax.jit(lambda o: postprocess.detect(
      o['cls_outputs'], o['box_outputs'], anchors, size, pre_nms_top_k=top_k,
      tile_size=tile, vectorize=vectorize))(outputs)
  cls, box = losses.flatten_outputs(outputs)
  counts = []
  for b in range(batch):
    rb, rs, rc = np_detect(np.asarray(cls[b]), np.asarray(box[b]), anchors,
                           size, top_k, 0.05, 0.5, 100)
    n = int(det['num_detections'][b])
    counts.append(n)
    assert n == len(rs)
    np.testing.assert_allclose(det['boxes'][b, :n], rb, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(det['scores'][b, :n], rs, rtol=1e-5)
    np.testing.assert_array_equal(det['classes'][b, :n], rc)
    assert (np.asarray(det['scores'][b, n:]) == 0).all()
    assert (np.asarray(det['classes'][b, n:]) == 0).all()
    assert (np.asarray(det['boxes'][b, n:]) == 0).all()
  assert det['boxes'].shape == (batch, 100, 4)
  if offset <= -14:
    assert max(counts) < 100


def np_model_garden_v2(logits, deltas, anchors, size, top_k, score_thr,
                       iou_thr, max_det):
  """Model Garden's v2 order: per-class top-k, per-class NMS, merge."""
  scores = 1 / (1 + np.exp(-logits[:, 1:].astype(np.float64)))
  found = []
  for c in range(scores.shape[1]):
    idx = np.argsort(-scores[:, c], kind='stable')[:top_k]
    idx = idx[scores[idx, c] > score_thr]
    boxes = np.asarray(box_ops.clip(box_ops.decode(deltas[idx], anchors[idx]),
                                    size))
    for k in np_greedy_nms(boxes, np.zeros(len(idx)), max_det, iou_thr):
      found.append((scores[idx[k], c], c + 1, tuple(boxes[k])))
  found.sort(key=lambda f: -f[0])
  return found[:max_det]


def test_detect_equals_model_garden_order_when_full():
  """Global top-k + one NMS pass == per-class top-k + per-class NMS."""
  rng = np.random.default_rng(11)
  size, c = 128, 4
  outputs = fake_outputs(rng, size, c, 1, scale=3.0)
  anchors = anchors_lib.multilevel_anchors(size)
  cls, box = losses.flatten_outputs(outputs)
  det = postprocess.detect(cls, box, anchors, size, pre_nms_top_k=600)
  assert int(det['num_detections'][0]) == 100
  ref = np_model_garden_v2(np.asarray(cls[0]), np.asarray(box[0]), anchors,
                           size, 600, 0.05, 0.5, 100)
  np.testing.assert_allclose(det['scores'][0], [r[0] for r in ref], rtol=1e-5)
  np.testing.assert_array_equal(det['classes'][0], [r[1] for r in ref])
  np.testing.assert_allclose(det['boxes'][0], [r[2] for r in ref], atol=1e-3)


def test_detect_per_image_clip_and_errors():
  rng = np.random.default_rng(9)
  outputs = fake_outputs(rng, 128, 3, 2)
  anchors = anchors_lib.multilevel_anchors(128)
  det = jax.jit(lambda c, b, s: postprocess.detect(c, b, anchors, s))(
      outputs['cls_outputs'], outputs['box_outputs'],
      np.array([[128, 128], [64, 96]]))
  boxes = np.asarray(det['boxes'][1])
  assert boxes[:, [0, 2]].max() <= 64 and boxes[:, [1, 3]].max() <= 96
  assert int(det['num_detections'][0]) == 100
  with pytest.raises(ValueError, match='anchors'):
    postprocess.detect(outputs['cls_outputs'], outputs['box_outputs'],
                       anchors[:-1], 128)


def test_detect_takes_traced_anchors():
  """Anchors as an argument of the jitted caller give the same detections."""
  rng = np.random.default_rng(9)
  outputs = fake_outputs(rng, 128, 3, 2)
  anchors = anchors_lib.multilevel_anchors(128)
  want = jax.jit(lambda c, b: postprocess.detect(c, b, anchors, 128))(
      outputs['cls_outputs'], outputs['box_outputs'])
  got = jax.jit(lambda c, b, a: postprocess.detect(c, b, a, 128))(
      outputs['cls_outputs'], outputs['box_outputs'], jnp.asarray(anchors))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize('axis_type', ['explicit', 'auto'])
def test_sharded_matches_unsharded(axis_type):
  """Batch sharded over 8 devices (jax.make_mesh: Explicit axes by default)."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(10)
  size, c, batch = 128, 4, 8
  kind = {'explicit': jax.sharding.AxisType.Explicit,
          'auto': jax.sharding.AxisType.Auto}[axis_type]
  mesh = jax.make_mesh((8,), ('data',), axis_types=(kind,))
  data = NamedSharding(mesh, P('data'))
  anchors = anchors_lib.multilevel_anchors(size)
  boxes, classes, crowd = _random_gt(rng, batch, 5, size)
  outputs = fake_outputs(rng, size, c, batch)

  def step(outputs, boxes, classes, crowd):
    t = targets.assign_batch(anchors, boxes, classes, crowd)
    loss, _ = losses.retinanet_loss(outputs, t)
    dets = [postprocess.detect(outputs['cls_outputs'], outputs['box_outputs'],
                               anchors, size, pre_nms_top_k=500, vectorize=v)
            for v in (True, False)]
    return t, loss, dets

  ref = jax.jit(step)(outputs, boxes, classes, crowd)
  args = jax.device_put((outputs, boxes, classes, crowd), data)
  got = jax.jit(step, in_shardings=data)(*args)
  for x in (got[0]['cls_targets'], got[2][0]['boxes'], got[2][1]['boxes']):
    assert x.sharding.is_equivalent_to(data, x.ndim)
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5)
  for r, g in zip(jax.tree.leaves(ref[2][0]), jax.tree.leaves(got[2][1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5)
