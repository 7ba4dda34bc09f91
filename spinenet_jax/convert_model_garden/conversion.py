"""Building our model and config from a Model Garden checkpoint; converting.

Layouts: Keras conv kernels are HWIO like ours; Keras depthwise kernels are
`[k, k, C, 1]`, ours `[k, k, 1, C]` (a reshape); Dense `[in, out]` as ours.
BN gamma/beta -> params scale/bias; moving_mean/moving_variance ->
batch_stats mean/var. Optimizer slots and the save counter are ignored.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import numpy as np

from spinenet_jax import specs as specs_lib
from spinenet_jax.convert_model_garden import matching
from spinenet_jax.convert_model_garden.matching import ConversionError
from spinenet_jax.convert_model_garden.tf_checkpoint import ATTR
from spinenet_jax.convert_model_garden.tf_checkpoint import read_tf_checkpoint


def infer_model_fields(arrays: dict[str, np.ndarray], model_id: str, task: str,
                       num_classes: int | None, num_anchors: int = 9
                       ) -> dict[str, Any]:
  """Config fields the checkpoint fixes: widths Model Garden may set
  differently from our defaults (e.g. 49S endpoints: 128 in Model Garden's
  scaling map, 256 in ours), number of head convs and of classes."""
  fields: dict[str, Any] = {'model_id': model_id}
  head = matching.find_head_root(arrays)
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
    root = matching.find_backbone_root(arrays)
    _, problems = matching.map_classifier_head(arrays, root)
    if not problems:
      dense = [v for k, v in arrays.items() if not k.startswith(root)
               and v.ndim == 2]
      fields['num_classes'] = int(dense[0].shape[1])
  if num_classes is not None:
    fields['num_classes'] = num_classes
  return fields


def build_config(task: str, fields: dict[str, Any], image_size: int):
  """The run's config: the project's defaults for the task (`configs.common`,
  so evaluation and data settings are stated once), float32, with
  `config.model` = exactly the converted model's `fields`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  detection = task == 'retinanet'
  c = (common.detection_config('coco/2017') if detection
       else common.classification_config('imagenet2012'))
  model = dict(fields)
  model.setdefault('activation', None)  # None: the model id's own.
  c.model = ml_collections.ConfigDict(model)
  c.data.image_size = image_size
  c.dtype = 'float32'
  c.imported_from = 'tf-model-garden'
  return c


def default_image_size(model_id: str, task: str) -> int:
  """Model Garden's training image size for the model id and task."""
  if task == 'classification':
    return 224
  if specs_lib.is_mobile(model_id):
    return specs_lib.get_mobile_scaling(model_id).image_size
  return {'49S': 640, '49': 640, '96': 1024}.get(model_id, 1280)


def convert_arrays(arrays: dict[str, np.ndarray], full_names: dict[str, str],
                   model: Any, task: str, backbone_only: bool = False,
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

  root = matching.find_backbone_root(arrays)
  mapping, problems = matching.map_backbone(model, arrays, full_names, root)
  if not backbone_only:
    if task == 'retinanet':
      head_root = matching.find_head_root(arrays)
      if head_root is None:
        problems.append('no RetinaNet head in the checkpoint (keys .../head/'
                        '_cls_convs/...); pass --backbone_only to start the '
                        'head from scratch')
      else:
        m, p = matching.map_retinanet_head(model, arrays, head_root)
        mapping.update(m)
        problems += p
    else:
      m, p = matching.map_classifier_head(arrays, root)
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
    fresh = traverse_util.flatten_dict(fresh_head(model, seed), sep='/')
    for k in head_init:
      values[k] = np.asarray(fresh[k])
  nested = traverse_util.unflatten_dict(values, sep='/')
  nested.setdefault('batch_stats', {})
  return nested


def fresh_head(model: Any, seed: int) -> dict[str, Any]:
  """Newly initialised head variables ({'params': {'head': ...}, ...}).

  The model's own head (`model.head()`), initialised on small zero features
  (cheaper than initialising the whole model).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  width = model.backbone().setting('endpoints_num_filters')
  feats = {l: jnp.zeros((1, 2 ** (model.max_level - l), 2 ** (
      model.max_level - l), width)) for l in range(model.min_level,
                                                    model.max_level + 1)}
  v = model.head().init(jax.random.key(seed), feats, train=False)
  return {col: {'head': tree} for col, tree in v.items()}


def write_run(output: str, config, variables: dict[str, Any]) -> None:
  """Writes checkpoints/0/state (params, batch_stats) and config.json."""
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
  checkpoints.save_config(output, config)


def convert(checkpoint: str, model_id: str, task: str, output: str,
            num_classes: int | None = None, backbone_only: bool = False,
            image_size: int | None = None, seed: int = 0,
            model_overrides: dict[str, Any] | None = None):
  """Converts a Model Garden checkpoint; returns (config, variables).

  `checkpoint` is the TF checkpoint prefix; `output`, if not empty, the run
  directory to write (`write_run`). `model_overrides` sets further
  `config.model` fields (e.g. filter_size_scale for a non-standard width).
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
