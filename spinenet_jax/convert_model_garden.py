"""Import TF2 Model Garden SpineNet checkpoints into a spinenet_jax run directory.

```
python -m spinenet_jax.convert_model_garden --checkpoint=TF_CKPT_PREFIX \
    --model=49 --task=retinanet --output=DIR [--num_classes=91]
```

reads a Model Garden (`official.vision`) checkpoint (a RetinaNet, a
classifier or a backbone alone; SpineNet 49S/49/96/143/143L/190 and the
SpineNet-Mobile ids 49_mobile/49S_mobile/49XS_mobile) with
`tf.train.load_checkpoint` and writes `DIR/config.json` and the Orbax
checkpoint `DIR/checkpoints/0/state` (params and batch_stats), the layout
`spinenet_jax.load_checkpoint(DIR)` opens.

How variables are matched
-------------------------
Model Garden's SpineNet is a Keras *functional* model. Its checkpoint keys
name the layers by position, `backbone/layer_with_weights-N/...`, and that
position is Keras' topological order, not the order the code creates the
layers in. The checkpoint's object graph also stores each variable's full
name, e.g. `conv2d_5/kernel` or `bottleneck_block_3/conv2d_1/kernel`: the
Keras auto-names carry a per-class counter that follows creation order. So:

1. for every top-level backbone layer, take the name of the layer from its
   variables' full names (`conv2d_5`, `batch_normalization_12`,
   `residual_block_2`, ...), i.e. its class (role) and creation index;
2. sort the layers of each role by creation index;
3. generate, from our own network plan, the sequence of layers Model Garden
   creates for each role (stem conv, stem BN, stem blocks, then per block:
   the resampling convs/BNs of input 0 and 1 and the block group; endpoint
   convs/BNs last), skipping what Keras does not keep (the dead level-2
   output block and its resamplers: they are not reachable from the
   endpoints, so the functional model holds no weights for them);
4. pair the two sequences role by role.

Every pairing is then checked by shape; a mismatch, a missing or an
unexpected variable is reported by name in one error. The head (RetinaNet
`_cls_convs/i`, `_cls_norms/j/i`, `_classifier`, ...) has informative
attribute names and is mapped by name.

Layouts: Keras conv kernels are HWIO like ours; Keras depthwise kernels are
`[k, k, C, 1]`, ours `[k, k, 1, C]` (a reshape); Dense `[in, out]` as ours.
BN gamma/beta -> params scale/bias; moving_mean/moving_variance ->
batch_stats mean/var. Optimizer slots and the save counter are ignored.

Not semantically identical: Model Garden's image classifier pools only the
top endpoint (level 7) before its Dense layer, while our `Classifier` averages
levels 3..7; `--task=classification` converts the weights and warns.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from spinenet_jax import specs as specs_lib

ATTR = '/.ATTRIBUTES/VARIABLE_VALUE'
BN_ROLE = 'batch_normalization'
BLOCK_ROLES = ('bottleneck_block', 'residual_block', 'inverted_bottleneck_block')
_ROLE_ALIASES = {'sync_batch_normalization': BN_ROLE}
_LAYER_NAME = re.compile(r'^(.*?)(?:_(\d+))?$')


class ConversionError(ValueError):
  """The checkpoint does not fit the requested model; names every problem."""


# --------------------------------------------------------------------------
# Reading a TF checkpoint.


def read_tf_checkpoint(prefix: str) -> tuple[dict[str, np.ndarray],
                                             dict[str, str]]:
  """(checkpoint key -> array, checkpoint key -> variable full name)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=g-import-not-at-top
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f'Cannot read a TF checkpoint at {prefix!r} '
                            f'(give the prefix, e.g. .../ckpt-231000): {e}')
  shapes = reader.get_variable_to_shape_map()
  arrays = {k: reader.get_tensor(k) for k in shapes
            if k.endswith(ATTR) and '.OPTIMIZER_SLOT' not in k
            and not k.startswith(('optimizer/', 'save_counter', 'global_step'))}
  full_names = {}
  if '_CHECKPOINTABLE_OBJECT_GRAPH' in shapes:
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    for node in graph.nodes:
      for attr in node.attributes:
        if attr.checkpoint_key in arrays and attr.full_name:
          full_names[attr.checkpoint_key] = attr.full_name
  return arrays, full_names


# --------------------------------------------------------------------------
# What Model Garden creates, in creation order, per role.


def _conv_bn(prefix: str) -> list[tuple[str, str]]:
  return [('conv2d', f'{prefix}/conv'), (BN_ROLE, f'{prefix}/norm/bn')]


def _backbone_module(model):
  """An unbound backbone with the model's layout fields (for `_plan`)."""
  from spinenet_jax.spinenet import SpineNet  # pylint: disable=g-import-not-at-top
  from spinenet_jax.spinenet_mobile import SpineNetMobile  # pylint: disable=g-import-not-at-top
  common = dict(model_id=model.model_id, block_specs=model.block_specs,
                min_level=model.min_level, max_level=model.max_level,
                endpoints_num_filters=model.endpoints_num_filters,
                filter_size_scale=model.filter_size_scale,
                block_repeats=model.block_repeats)
  if model.is_mobile:
    return SpineNetMobile(**common)
  return SpineNet(resample_alpha=model.resample_alpha, **common)


def expected_backbone_layers(model) -> list[tuple[str, str]]:
  """(role, our module path) of Model Garden's backbone layers, created order.

  `model` is our RetinaNet / Classifier. Paths are relative to 'backbone'.
  """
  bb = _backbone_module(model)
  _, nodes, _ = bb.plan()
  repeats = bb.setting('block_repeats')
  layers = []
  if model.is_mobile:
    layers += _conv_bn('stem_conv')
    for g in range(2):
      layers += [('inverted_bottleneck_block', f'stem_block{g}_{r}')
                 for r in range(repeats)]
    widths = {0: 1, 1: 2}  # level of each feature
    for node in nodes:
      for k, j in enumerate(node.inputs):
        for d in range(max(node.level - widths[j], 0)):
          layers += [('depthwise_conv2d', f'resample{node.index}_{k}/down{d}/conv'),
                     (BN_ROLE, f'resample{node.index}_{k}/down{d}/norm/bn')]
        layers += _conv_bn(f'resample{node.index}_{k}/project')
      widths[node.index] = node.level
      layers += [('inverted_bottleneck_block', f'block{node.index}_{r}')
                 for r in range(repeats)]
  else:
    layers += _conv_bn('stem_conv')
    for g in range(2):
      layers += [('bottleneck_block', f'stem_block{g}_{r}')
                 for r in range(repeats)]
    levels = {0: 2, 1: 2}
    for node in nodes:
      for k, j in enumerate(node.inputs):
        p = f'resample{node.index}_{k}'
        layers += _conv_bn(f'{p}/reduce')
        if levels[j] < node.level:
          layers += _conv_bn(f'{p}/down')
        layers += _conv_bn(f'{p}/project')
      levels[node.index] = node.level
      layers += [(f'{node.block_fn}_block', f'block{node.index}_{r}')
                 for r in range(repeats)]
  for level in range(model.min_level, model.max_level + 1):
    layers += _conv_bn(f'endpoint{level}')
  return layers


# Sub-layer attribute -> our sub-module, per block class.
_BLOCK_SUBLAYERS = {
    'bottleneck_block': {
        '_conv1': 'conv1/conv', '_norm1': 'conv1/norm/bn',
        '_conv2': 'conv2/conv', '_norm2': 'conv2/norm/bn',
        '_conv3': 'conv3/conv', '_norm3': 'conv3/norm/bn',
        '_shortcut': 'shortcut/conv', '_norm0': 'shortcut/norm/bn'},
    'residual_block': {
        '_conv1': 'conv1/conv', '_norm1': 'conv1/norm/bn',
        '_conv2': 'conv2/conv', '_norm2': 'conv2/norm/bn',
        '_shortcut': 'shortcut/conv', '_norm0': 'shortcut/norm/bn'},
    'inverted_bottleneck_block': {
        '_conv0': 'expand/conv', '_norm0': 'expand/norm/bn',
        '_conv1': 'depthwise/conv', '_norm1': 'depthwise/norm/bn',
        '_squeeze_excitation/_se_reduce': 'se/reduce',
        '_squeeze_excitation/_se_expand': 'se/expand',
        '_conv2': 'project/conv', '_norm2': 'project/norm/bn'},
}

_BN_VARS = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
            'moving_mean': ('batch_stats', 'mean'),
            'moving_variance': ('batch_stats', 'var')}


def _depthwise_to_ours(x: np.ndarray) -> np.ndarray:
  """Keras [k, k, C, 1] -> ours [k, k, 1, C]."""
  return x.reshape(x.shape[0], x.shape[1], 1, -1)


def _leaf(collection: str, path: str, tf_var: str) -> tuple[str, Callable | None]:
  """Our flat key and transform for a TF variable of a layer at `path`."""
  if tf_var in _BN_VARS:
    col, name = _BN_VARS[tf_var]
    return f'{col}/{path}/{name}', None
  if tf_var == 'depthwise_kernel':
    return f'{collection}/{path}/depthwise_kernel', _depthwise_to_ours
  return f'{collection}/{path}/{tf_var}', None


def _map_layer(role: str, path: str, sub: str) -> tuple[str, Callable | None] | None:
  """Maps `sub` (the key inside a top-level layer, e.g. '_conv1/kernel')."""
  if role in BLOCK_ROLES:
    table = _BLOCK_SUBLAYERS[role]
    for attr in sorted(table, key=len, reverse=True):
      if sub.startswith(attr + '/'):
        return _leaf('params', f'{path}/{table[attr]}', sub[len(attr) + 1:])
    return None
  if '/' in sub:
    return None
  return _leaf('params', path, sub)


# --------------------------------------------------------------------------
# Locating the parts of the checkpoint.


def _strip(key: str) -> str:
  return key[:-len(ATTR)]


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
    sub = _strip(key)[len(root_layer):]  # e.g. '_conv1/kernel'
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


def map_backbone(model, arrays: dict[str, np.ndarray],
                 full_names: dict[str, str], root: str
                 ) -> tuple[dict[str, tuple[str, Callable | None]], list[str]]:
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
  for role, path in expected_backbone_layers(model):
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
        sub = _strip(key)[len(layer):]
        target = _map_layer(role, f'backbone/{path}', sub)
        if target is None:
          problems.append(f'unexpected variable {key} ({role} layer '
                          f'mapped to backbone/{path})')
          continue
        mapping[target[0]] = (key, target[1])
  return mapping, problems


def find_head_root(arrays: dict[str, np.ndarray]) -> str | None:
  roots = set()
  for key in arrays:
    m = re.match(r'^(.*?/)?(_?head)/_(cls|box)_convs/', key)
    if m:
      roots.add((m.group(1) or '') + m.group(2) + '/')
  if len(roots) > 1:
    raise ConversionError(f'Several RetinaNet heads in the checkpoint: '
                          f'{sorted(roots)}.')
  return roots.pop() if roots else None


def map_retinanet_head(model, arrays: dict[str, np.ndarray], root: str
                       ) -> tuple[dict[str, tuple[str, Callable | None]],
                                  list[str]]:
  mapping, problems = {}, []
  for key in arrays:
    if not key.startswith(root):
      continue
    sub = _strip(key)[len(root):]
    parts = sub.split('/')
    target = None
    m_conv = re.match(r'^_(cls|box)_convs$', parts[0])
    m_norm = re.match(r'^_(cls|box)_norms$', parts[0])
    if m_conv and len(parts) == 3:
      tower = 'class' if m_conv.group(1) == 'cls' else 'box'
      target = _leaf('params', f'head/{tower}_conv{parts[1]}', parts[2])
    elif m_norm and len(parts) == 4:
      tower = 'class' if m_norm.group(1) == 'cls' else 'box'
      level = model.min_level + int(parts[1])
      target = _leaf('params', f'head/{tower}_norm{level}_{parts[2]}/bn',
                     parts[3])
    elif parts[0] in ('_classifier', '_box_regressor') and len(parts) == 2:
      tower = 'class' if parts[0] == '_classifier' else 'box'
      target = _leaf('params', f'head/{tower}_predict', parts[1])
    if target is None:
      problems.append(f'unexpected variable {key} (not part of our '
                      'RetinaNetHead)')
    else:
      mapping[target[0]] = (key, target[1])
  return mapping, problems


def map_classifier_head(arrays: dict[str, np.ndarray], backbone_root: str
                        ) -> tuple[dict[str, tuple[str, Callable | None]],
                                   list[str]]:
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


# --------------------------------------------------------------------------
# Building the model and converting.


def infer_model_fields(arrays: dict[str, np.ndarray], model_id: str, task: str,
                       num_classes: int | None, num_anchors: int = 9
                       ) -> dict[str, Any]:
  """Config fields the checkpoint fixes: widths Model Garden may set
  differently from our defaults (e.g. 49S endpoints: 128 in Model Garden's
  scaling map, 256 in ours), number of head convs and of classes."""
  fields: dict[str, Any] = {'model_id': model_id}
  head = find_head_root(arrays)
  if task == 'retinanet' and head is not None:
    convs = sorted({int(m.group(1)) for k in arrays for m in
                    [re.match(re.escape(head) + r'_cls_convs/(\d+)/', k)] if m})
    first = head + '_cls_convs/0/'
    if first + 'kernel' + ATTR in arrays:
      kshape = arrays[first + 'kernel' + ATTR].shape
      fields['endpoints_num_filters'] = int(kshape[2])
      fields['head_num_filters'] = int(kshape[3])
      fields['head_use_separable_conv'] = False
    elif first + 'pointwise_kernel' + ATTR in arrays:
      kshape = arrays[first + 'pointwise_kernel' + ATTR].shape
      fields['endpoints_num_filters'] = int(kshape[2])
      fields['head_num_filters'] = int(kshape[3])
      fields['head_use_separable_conv'] = True
    fields['head_num_convs'] = len(convs)
    cls = head + '_classifier/bias' + ATTR
    if cls in arrays and num_classes is None:
      fields['num_classes'] = int(arrays[cls].shape[0]) // num_anchors
  if task == 'classification' and num_classes is None:
    root = find_backbone_root(arrays)
    _, problems = map_classifier_head(arrays, root)
    if not problems:
      dense = [v for k, v in arrays.items() if not k.startswith(root)
               and v.ndim == 2]
      fields['num_classes'] = int(dense[0].shape[1])
  if num_classes is not None:
    fields['num_classes'] = num_classes
  return fields


def build_config(task: str, fields: dict[str, Any], image_size: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = dict(fields)
  model.setdefault('activation', None)
  c = ml_collections.ConfigDict()
  c.task = task
  c.dtype = 'float32'
  c.seed = 0
  c.model = ml_collections.ConfigDict(model)
  detection = task == 'retinanet'
  c.data = ml_collections.ConfigDict(dict(
      name='coco/2017' if detection else 'imagenet2012',
      image_size=image_size))
  if detection:
    c.eval = ml_collections.ConfigDict(dict(
        pre_nms_top_k=5000, score_threshold=0.05, iou_threshold=0.5,
        max_detections=100))
  c.imported_from = 'tf-model-garden'
  return c


def default_image_size(model_id: str, task: str) -> int:
  if task == 'classification':
    return 224
  if specs_lib.is_mobile(model_id):
    return specs_lib.get_mobile_scaling(model_id).image_size
  return {'49S': 640, '49': 640, '96': 1024}.get(model_id, 1280)


def convert_arrays(arrays: dict[str, np.ndarray], full_names: dict[str, str],
                   model, task: str, backbone_only: bool = False,
                   image_size: int = 256, seed: int = 0
                   ) -> dict[str, Any]:
  """Model Garden arrays -> our {'params', 'batch_stats'} (nested dicts).

  Raises ConversionError naming every missing, unexpected or mis-shaped
  variable.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  if task == 'classification':
    size = image_size
  else:
    size = 2 ** max(model.max_level, 7)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False))
  ours = traverse_util.flatten_dict(
      {k: shapes[k] for k in ('params', 'batch_stats') if k in shapes},
      sep='/')

  root = find_backbone_root(arrays)
  mapping, problems = map_backbone(model, arrays, full_names, root)
  head_keys: set[str] = set()
  if not backbone_only:
    if task == 'retinanet':
      head_root = find_head_root(arrays)
      if head_root is None:
        problems.append('no RetinaNet head in the checkpoint (keys .../head/'
                        '_cls_convs/...); pass --backbone_only to start the '
                        'head from scratch')
      else:
        m, p = map_retinanet_head(model, arrays, head_root)
        mapping.update(m)
        problems += p
    else:
      m, p = map_classifier_head(arrays, root)
      mapping.update(m)
      problems += p
  used = {tf_key for tf_key, _ in mapping.values()}
  for key in sorted(arrays):
    in_backbone = key.startswith(root)
    if key not in used and (in_backbone or not backbone_only):
      if not any(key in p for p in problems):
        problems.append(f'unexpected variable {key} (not used by the model)')
  values, head_init = {}, []
  for our_key in sorted(ours):
    want = tuple(ours[our_key].shape)
    if our_key not in mapping:
      if backbone_only and not our_key.split('/')[1] == 'backbone':
        head_init.append(our_key)
        continue
      problems.append(f'missing variable for {our_key} {list(want)}')
      continue
    tf_key, transform = mapping[our_key]
    value = np.asarray(arrays[tf_key], np.float32)
    if transform is not None:
      value = transform(value)
    if tuple(value.shape) != want:
      problems.append(f'wrong shape: {tf_key} has {list(arrays[tf_key].shape)}'
                      f', {our_key} needs {list(want)}')
      continue
    values[our_key] = value
  for our_key in sorted(set(mapping) - set(ours)):
    problems.append(f'unexpected variable {mapping[our_key][0]} (would be '
                    f'{our_key}, which SpineNet-{model.model_id} does not have)')
  if problems:
    raise ConversionError(
        f'The checkpoint does not fit {type(model).__name__} SpineNet-'
        f'{model.model_id} ({len(problems)} problems):\n  ' +
        '\n  '.join(problems))
  if head_init:
    fresh = traverse_util.flatten_dict(_fresh_head(model, seed), sep='/')
    for k in head_init:
      values[k] = np.asarray(fresh[k])
  nested = traverse_util.unflatten_dict(values, sep='/')
  nested.setdefault('batch_stats', {})
  return nested


def _fresh_head(model, seed: int) -> dict[str, Any]:
  """Newly initialised head variables ({'params': {'head': ...}, ...}),
  built as `models.RetinaNet` / `models.Classifier` build their heads, on
  small zero features (cheaper than initialising the whole model)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spinenet_jax import heads  # pylint: disable=g-import-not-at-top
  bb = _backbone_module(model)
  width = bb.setting('endpoints_num_filters')
  feats = {l: jnp.zeros((1, 2 ** (model.max_level - l), 2 ** (
      model.max_level - l), width)) for l in range(model.min_level,
                                                    model.max_level + 1)}
  if hasattr(model, 'num_anchors'):
    s = model.scaling()
    head = heads.RetinaNetHead(
        model.num_classes, model.num_anchors,
        s.head_num_convs if model.head_num_convs is None
        else model.head_num_convs,
        s.head_num_filters if model.head_num_filters is None
        else model.head_num_filters,
        model.resolved_activation(), model.bn_momentum, model.bn_epsilon,
        use_separable_conv=(getattr(s, 'head_use_separable_conv', False)
                            if model.head_use_separable_conv is None
                            else model.head_use_separable_conv))
  else:
    head = heads.ClassificationHead(model.num_classes, model.dropout_rate)
  v = head.init(jax.random.key(seed), feats, train=False)
  return {col: {'head': tree} for col, tree in v.items()}


def write_run(output: str, config, variables: dict[str, Any]) -> None:
  """Writes config.json and checkpoints/0/state (params, batch_stats)."""
  from spinenet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  os.makedirs(output, exist_ok=True)
  if checkpoints.saved_steps(output):
    raise FileExistsError(f'{output} already holds checkpoints; choose an '
                          'empty --output directory.')
  manager = checkpoints.create_manager(output, keep=1, async_save=False)
  state = {'step': np.asarray(0, np.int32),
           'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {})}
  checkpoints.save(manager, 0, state, force=True)
  manager.wait_until_finished()
  manager.close()
  path = os.path.join(output, checkpoints.CONFIG_FILE)
  with open(path, 'w') as f:
    f.write(config.to_json(indent=2))


def convert(checkpoint: str, model_id: str, task: str, output: str,
            num_classes: int | None = None, backbone_only: bool = False,
            image_size: int | None = None, seed: int = 0,
            model_overrides: dict[str, Any] | None = None):
  """Converts; returns (config, variables). See the module docstring.

  `model_overrides` sets further `config.model` fields (e.g.
  filter_size_scale for a non-standard width).
  """
  from spinenet_jax import models  # pylint: disable=g-import-not-at-top
  if task not in models.TASKS:
    raise ValueError(f'--task must be one of {sorted(models.TASKS)}, got '
                     f'{task!r}.')
  specs_lib.get_any_scaling(model_id)  # Raises on unknown ids.
  arrays, full_names = read_tf_checkpoint(checkpoint)
  fields = infer_model_fields(arrays, model_id, task, num_classes)
  if backbone_only:
    fields = {k: v for k, v in fields.items()
              if k in ('model_id', 'num_classes')}
    if task == 'retinanet':
      fields.setdefault('num_classes', num_classes or 91)
    else:
      fields.setdefault('num_classes', num_classes or 1001)
  if task == 'classification':
    print('WARNING: Model Garden\'s classifier pools only the level-7 '
          'endpoint; spinenet_jax.Classifier averages levels 3..7. The '
          'weights are converted but the logits will differ until fine-tuned.',
          file=sys.stderr)
  fields.update(model_overrides or {})
  image_size = image_size or default_image_size(model_id, task)
  config = build_config(task, fields, image_size)
  model = models.build_model(config)
  variables = convert_arrays(arrays, full_names, model, task, backbone_only,
                             seed=seed, image_size=image_size)
  if output:
    write_run(output, config, variables)
  return config, variables


def model_garden_layout(model, variables: dict[str, Any], order_seed: int = 0,
                        root: str = 'model/_backbone/',
                        head_root: str = 'model/_head/'
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The inverse mapping: our variables as Model Garden would store them.

  Returns (checkpoint key -> array in Keras layout, key -> full name). The
  functional positions `layer_with_weights-N` are a random permutation
  (`order_seed`) of the creation order, as Keras' topological order is;
  the full names carry the creation order (`conv2d_7`, ...). For tests.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(variables, sep='/')
  layers = expected_backbone_layers(model)
  perm = np.random.default_rng(order_seed).permutation(len(layers))
  counters: dict[str, int] = {}
  arrays, names = {}, {}

  def emit(prefix, full_prefix, path, sub_vars):
    for tf_var in sub_vars:
      our, transform = _leaf('params', path, tf_var)
      if our not in flat:
        continue
      value = np.asarray(flat[our])
      if transform is not None:  # ours [k, k, 1, C] -> Keras [k, k, C, 1]
        value = value.reshape(value.shape[0], value.shape[1], -1, 1)
      key = f'{prefix}{tf_var}{ATTR}'
      arrays[key] = value
      names[key] = f'{full_prefix}{tf_var}'

  conv_vars = ('kernel', 'bias', 'depthwise_kernel', 'pointwise_kernel')
  bn_vars = tuple(_BN_VARS)
  for (role, path), n in zip(layers, perm):
    idx = counters.get(role, 0)
    counters[role] = idx + 1
    name = role if idx == 0 else f'{role}_{idx}'
    prefix = f'{root}layer_with_weights-{n}/'
    if role in BLOCK_ROLES:
      for attr, sub in _BLOCK_SUBLAYERS[role].items():
        full = '/'.join(c.lstrip('_') for c in attr.split('/'))
        emit(f'{prefix}{attr}/', f'{name}/{full}/', f'backbone/{path}/{sub}',
             bn_vars if sub.endswith('/bn') else conv_vars)
    else:
      emit(prefix, f'{name}/', f'backbone/{path}',
           bn_vars if role == BN_ROLE else conv_vars)
  head_paths = {k.split('/')[2] for k in flat if k.split('/')[1] == 'head'}
  for module in sorted(head_paths):
    m = re.match(r'^(class|box)_(conv(\d+)|norm(\d+)_(\d+)|predict)$', module)
    if not m:
      continue
    t = '_cls' if m.group(1) == 'class' else '_box'
    if m.group(3) is not None:
      sub, path, vs = f'{t}_convs/{m.group(3)}/', f'head/{module}', conv_vars
    elif m.group(4) is not None:
      j = int(m.group(4)) - model.min_level
      sub, path, vs = f'{t}_norms/{j}/{m.group(5)}/', f'head/{module}/bn', bn_vars
    else:
      sub = '_classifier/' if t == '_cls' else '_box_regressor/'
      path, vs = f'head/{module}', conv_vars
    emit(head_root + sub, 'retina_net_model/retina_net_head/' + sub, path, vs)
  if 'params/head/logits/kernel' in flat:
    for v in ('kernel', 'bias'):
      key = f'model/layer_with_weights-1/{v}{ATTR}'
      arrays[key] = np.asarray(flat[f'params/head/logits/{v}'])
      names[key] = f'dense/{v}'
  return arrays, names


def write_tf_checkpoint(prefix: str, arrays: dict[str, np.ndarray],
                        full_names: dict[str, str]) -> str:
  """Writes `arrays` (checkpoint key -> value) as an object-based TF
  checkpoint with those keys and variable full names. For tests."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = tf.Module()
  for key, value in arrays.items():
    parts = _strip(key).split('/')
    obj = root
    for part in parts[:-1]:
      if not hasattr(obj, part):
        setattr(obj, part, tf.Module())
      obj = getattr(obj, part)
    setattr(obj, parts[-1], tf.Variable(value, name=full_names.get(key, parts[-1])))
  tops = {_strip(k).split('/')[0] for k in arrays}
  assert tops == {'model'}, tops
  return tf.train.Checkpoint(model=root.model).write(prefix)  # pylint: disable=no-member


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m spinenet_jax.convert_model_garden',
      description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='TF checkpoint prefix, e.g. DIR/ckpt-231000')
  parser.add_argument('--model', default='49',
                      help='model id: 49S, 49, 96, 143, 143L, 190, '
                      '49_mobile, 49S_mobile, 49XS_mobile')
  parser.add_argument('--task', default='retinanet',
                      choices=['retinanet', 'classification'])
  parser.add_argument('--output', required=True, help='run directory to write')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='default: from the checkpoint')
  parser.add_argument('--backbone_only', action='store_true',
                      help='convert only the backbone; the head starts fresh')
  parser.add_argument('--image_size', type=int, default=None,
                      help='config.data.image_size (default: the model\'s)')
  args = parser.parse_args(argv)
  try:
    config, _ = convert(args.checkpoint, args.model, args.task, args.output,
                        args.num_classes, args.backbone_only, args.image_size)
  except (ConversionError, FileNotFoundError, FileExistsError,
          ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Wrote {args.output} (SpineNet-{args.model} {args.task}, '
        f'{json.dumps(config.model.to_dict())}).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
