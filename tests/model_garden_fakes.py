"""Fake Model Garden checkpoints for the converter's tests.

`model_garden_layout` is the converter's mapping run backwards: our
variables as Model Garden would store them; `write_tf_checkpoint` writes
them as an object-based TF checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from spinenet_jax.convert_model_garden import layout
from spinenet_jax.convert_model_garden.tf_checkpoint import ATTR, strip_attr


def model_garden_layout(model: Any, variables: dict[str, Any],
                        order_seed: int = 0,
                        root: str = 'model/_backbone/',
                        head_root: str = 'model/_head/'
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The inverse mapping: our variables as Model Garden would store them.

  Returns (checkpoint key -> array in Keras layout, key -> full name). The
  functional positions `layer_with_weights-N` are a random permutation
  (`order_seed`) of the creation order, as Keras' topological order is;
  the full names carry the creation order (`conv2d_7`, ...).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(variables, sep='/')
  layers = layout.expected_backbone_layers(model)
  perm = np.random.default_rng(order_seed).permutation(len(layers))
  counters: dict[str, int] = {}
  arrays, names = {}, {}

  def emit(prefix, full_prefix, path, sub_vars):
    for tf_var in sub_vars:
      our, transform = layout.leaf('params', path, tf_var)
      if our not in flat:
        continue
      value = np.asarray(flat[our])
      if transform is not None:  # ours [k, k, 1, C] -> Keras [k, k, C, 1]
        value = value.reshape(value.shape[0], value.shape[1], -1, 1)
      key = f'{prefix}{tf_var}{ATTR}'
      arrays[key] = value
      names[key] = f'{full_prefix}{tf_var}'

  conv_vars = ('kernel', 'bias', 'depthwise_kernel', 'pointwise_kernel')
  bn_vars = tuple(layout.BN_VARIABLES)
  for (role, path), n in zip(layers, perm):
    idx = counters.get(role, 0)
    counters[role] = idx + 1
    name = role if idx == 0 else f'{role}_{idx}'
    prefix = f'{root}layer_with_weights-{n}/'
    if role in layout.BLOCK_ROLES:
      for attr, sub in layout.BLOCK_SUBLAYERS[role].items():
        full = '/'.join(c.lstrip('_') for c in attr.split('/'))
        emit(f'{prefix}{attr}/', f'{name}/{full}/', f'backbone/{path}/{sub}',
             bn_vars if sub.endswith('/bn') else conv_vars)
    else:
      emit(prefix, f'{name}/', f'backbone/{path}',
           bn_vars if role == layout.BN_ROLE else conv_vars)
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
  checkpoint with those keys and variable full names; returns its prefix."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = tf.Module()
  for key, value in arrays.items():
    parts = strip_attr(key).split('/')
    obj = root
    for part in parts[:-1]:
      if not hasattr(obj, part):
        setattr(obj, part, tf.Module())
      obj = getattr(obj, part)
    setattr(obj, parts[-1], tf.Variable(value, name=full_names.get(key, parts[-1])))
  tops = {strip_attr(k).split('/')[0] for k in arrays}
  assert tops == {'model'}, tops
  return tf.train.Checkpoint(model=root.model).write(prefix)  # pylint: disable=no-member
