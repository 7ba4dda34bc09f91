"""Locating the parts of a Model Garden checkpoint and mapping them to ours.

Model Garden's SpineNet is a Keras *functional* model. Its checkpoint keys
name the layers by position, `backbone/layer_with_weights-N/...`, and that
position is Keras' topological order, not the order the code creates the
layers in. The checkpoint's object graph also stores each variable's full
name, e.g. `conv2d_5/kernel` or `bottleneck_block_3/conv2d_1/kernel`: the
Keras auto-names carry a per-class counter that follows creation order. So
`map_backbone`:

1. takes, for every top-level backbone layer, the name of the layer from its
   variables' full names (`conv2d_5`, `batch_normalization_12`,
   `residual_block_2`, ...), i.e. its class (role) and creation index;
2. sorts the layers of each role by creation index;
3. pairs them, role by role, with the sequence of layers Model Garden
   creates for that role (`layout.expected_backbone_layers`).

The heads have informative attribute names and are mapped by name: the
RetinaNet head of `official/vision/modeling/heads/dense_prediction_heads.py`
(`_cls_convs/i`, `_cls_norms/j/i`, `_classifier`, ...) and the Dense layer of
`official/vision/modeling/classification_model.py`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from spinenet_jax.convert_model_garden import layout
from spinenet_jax.convert_model_garden.tf_checkpoint import ATTR, strip_attr

# Our flat key ('params/backbone/...') -> (checkpoint key, transform).
Mapping = dict[str, tuple[str, layout.Transform | None]]

_ROLE_ALIASES = {'sync_batch_normalization': layout.BN_ROLE}
_LAYER_NAME = re.compile(r'^(.*?)(?:_(\d+))?$')


class ConversionError(ValueError):
  """The checkpoint does not fit the requested model; names every problem."""


def find_backbone_root(arrays: dict[str, np.ndarray]) -> str:
  """The key prefix of the backbone (ends with '/'), e.g. 'model/_backbone/'."""
  candidates = set()
  for key in arrays:
    m = re.match(r'^(.*?/)?(_?backbone)/layer_with_weights-\d+/', key)
    if m:
      candidates.add((m.group(1) or '') + m.group(2) + '/')
  if not candidates:  # e.g. a functional classifier: the stem conv's layer.
    for key, value in arrays.items():
      m = re.match(r'^(.*/)layer_with_weights-\d+/kernel' + re.escape(ATTR) + '$',
                   key)
      if m and value.ndim == 4 and value.shape[2] == 3:
        candidates.add(m.group(1))
  if len(candidates) != 1:
    raise ConversionError(
        'Cannot find the SpineNet backbone in the checkpoint (expected keys '
        'like model/_backbone/layer_with_weights-N/...); found '
        f'{sorted(candidates) or "none"}. Keys start with: '
        f'{sorted({k.split("/")[0] for k in arrays})}.')
  return candidates.pop()


def _layer_identity(sub_keys: list[str], full_names: dict[str, str],
                    root_layer: str) -> tuple[str, int]:
  """(role, creation index) of one top-level layer from its variables' names."""
  for key in sorted(sub_keys):
    full = full_names.get(key)
    if not full:
      continue
    sub = strip_attr(key)[len(root_layer):]  # e.g. '_conv1/kernel'
    comps = full.split('/')
    depth = len(sub.split('/'))
    if len(comps) <= depth:
      continue
    name = comps[-depth - 1]
    m = _LAYER_NAME.match(name)
    role = _ROLE_ALIASES.get(m.group(1), m.group(1))
    return role, int(m.group(2) or 0)
  raise ConversionError(
      f'The checkpoint stores no variable names for layer {root_layer!r}; '
      'cannot tell which SpineNet layer it is (written by an unsupported '
      'TF/Keras version?).')


def map_backbone(model: Any, arrays: dict[str, np.ndarray],
                 full_names: dict[str, str], root: str
                 ) -> tuple[Mapping, list[str]]:
  """(our flat key -> (tf key, transform)), problems (unmatched layers)."""
  by_layer: dict[str, list[str]] = {}
  for key in arrays:
    if not key.startswith(root):
      continue
    m = re.match(re.escape(root) + r'(layer_with_weights-\d+/)', key)
    if m:
      by_layer.setdefault(root + m.group(1), []).append(key)
  found: dict[str, list[tuple[int, str]]] = {}
  for layer, keys in by_layer.items():
    role, index = _layer_identity(keys, full_names, layer)
    found.setdefault(role, []).append((index, layer))
  expected: dict[str, list[str]] = {}
  for role, path in layout.expected_backbone_layers(model):
    expected.setdefault(role, []).append(path)

  mapping, problems = {}, []
  for role in sorted(set(found) | set(expected)):
    got = [layer for _, layer in sorted(found.get(role, []))]
    want = expected.get(role, [])
    if len(got) != len(want):
      problems.append(
          f'backbone: {len(got)} {role} layers in the checkpoint, '
          f'{len(want)} in SpineNet-{model.model_id} '
          f'(checkpoint: {got[:3]}...; ours: {want[:3]}...)')
    for layer, path in zip(got, want):
      for key in by_layer[layer]:
        sub = strip_attr(key)[len(layer):]
        target = layout.map_layer(role, f'backbone/{path}', sub)
        if target is None:
          problems.append(f'unexpected variable {key} ({role} layer '
                          f'mapped to backbone/{path})')
          continue
        mapping[target[0]] = (key, target[1])
  return mapping, problems


def find_head_root(arrays: dict[str, np.ndarray]) -> str | None:
  """The key prefix of the RetinaNet head (e.g. 'model/_head/'), or None."""
  roots = set()
  for key in arrays:
    m = re.match(r'^(.*?/)?(_?head)/_(cls|box)_convs/', key)
    if m:
      roots.add((m.group(1) or '') + m.group(2) + '/')
  if len(roots) > 1:
    raise ConversionError(f'Several RetinaNet heads in the checkpoint: '
                          f'{sorted(roots)}.')
  return roots.pop() if roots else None


def map_retinanet_head(model: Any, arrays: dict[str, np.ndarray], root: str
                       ) -> tuple[Mapping, list[str]]:
  """(our flat key -> (tf key, transform)), problems, for the head at `root`."""
  mapping, problems = {}, []
  for key in arrays:
    if not key.startswith(root):
      continue
    sub = strip_attr(key)[len(root):]
    parts = sub.split('/')
    target = None
    m_conv = re.match(r'^_(cls|box)_convs$', parts[0])
    m_norm = re.match(r'^_(cls|box)_norms$', parts[0])
    if m_conv and len(parts) == 3:
      tower = 'class' if m_conv.group(1) == 'cls' else 'box'
      target = layout.leaf('params', f'head/{tower}_conv{parts[1]}', parts[2])
    elif m_norm and len(parts) == 4:
      tower = 'class' if m_norm.group(1) == 'cls' else 'box'
      level = model.min_level + int(parts[1])
      target = layout.leaf('params', f'head/{tower}_norm{level}_{parts[2]}/bn',
                           parts[3])
    elif parts[0] in ('_classifier', '_box_regressor') and len(parts) == 2:
      tower = 'class' if parts[0] == '_classifier' else 'box'
      target = layout.leaf('params', f'head/{tower}_predict', parts[1])
    if target is None:
      problems.append(f'unexpected variable {key} (not part of our '
                      'RetinaNetHead)')
    else:
      mapping[target[0]] = (key, target[1])
  return mapping, problems


def map_classifier_head(arrays: dict[str, np.ndarray], backbone_root: str
                        ) -> tuple[Mapping, list[str]]:
  """The Dense layer of Model Garden's ClassificationModel."""
  dense = [k for k, v in arrays.items() if not k.startswith(backbone_root)
           and k.endswith('/kernel' + ATTR) and v.ndim == 2]
  if len(dense) != 1:
    return {}, [f'expected one Dense layer outside the backbone, found '
                f'{dense or "none"}']
  layer = dense[0][:-len('kernel' + ATTR)]
  mapping = {'params/head/logits/kernel': (dense[0], None)}
  if layer + 'bias' + ATTR in arrays:
    mapping['params/head/logits/bias'] = (layer + 'bias' + ATTR, None)
  problems = [f'unexpected variable {k} (a head batch norm?)' for k in arrays
              if not k.startswith(backbone_root) and not k.startswith(layer)]
  return mapping, problems
