"""What Model Garden's SpineNet creates, in creation order, per role.

A role is a Keras layer class as its auto-name spells it ('conv2d',
'batch_normalization', 'bottleneck_block', ...). The creation order is that
of `SpineNet._build_stem`, `SpineNet._build_scale_permuted_network` and
`SpineNet._build_endpoints` in
`official/vision/modeling/backbones/spinenet.py` (and their namesakes in
`official/vision/modeling/backbones/spinenet_mobile.py`); the sub-layer
attributes of the blocks are those of `BottleneckBlock`, `ResidualBlock` and
`InvertedBottleneckBlock` in `official/vision/modeling/layers/nn_blocks.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

BN_ROLE = 'batch_normalization'
BLOCK_ROLES = ('bottleneck_block', 'residual_block', 'inverted_bottleneck_block')

# Sub-layer attribute -> our sub-module, per block class.
BLOCK_SUBLAYERS = {
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

# Keras BatchNormalization variable -> (our collection, our variable).
BN_VARIABLES = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
                'moving_mean': ('batch_stats', 'mean'),
                'moving_variance': ('batch_stats', 'var')}

Transform = Callable[[np.ndarray], np.ndarray]


def _conv_bn(prefix: str) -> list[tuple[str, str]]:
  return [('conv2d', f'{prefix}/conv'), (BN_ROLE, f'{prefix}/norm/bn')]


def expected_backbone_layers(model: Any) -> list[tuple[str, str]]:
  """(role, our module path) of Model Garden's backbone layers, created order.

  `model` is our RetinaNet / Classifier. Paths are relative to 'backbone'.
  The stem comes first (conv, BN, the two level-2 block groups; mobile: the
  level-1 and level-2 groups), then per block the resampling layers of its
  inputs 0 and 1 and its block group, then the endpoint convs/BNs. The dead
  level-2 output block of SpineNet and its resamplers are not in our plan:
  they are unreachable from the endpoints, so Keras' functional model keeps
  no weights for them.
  """
  bb = model.backbone()
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


def depthwise_to_ours(x: np.ndarray) -> np.ndarray:
  """Keras depthwise kernel [k, k, C, 1] -> ours [k, k, 1, C]."""
  return x.reshape(x.shape[0], x.shape[1], 1, -1)


def leaf(collection: str, path: str, tf_var: str
         ) -> tuple[str, Transform | None]:
  """Our flat key and transform for a TF variable of a layer at `path`."""
  if tf_var in BN_VARIABLES:
    col, name = BN_VARIABLES[tf_var]
    return f'{col}/{path}/{name}', None
  if tf_var == 'depthwise_kernel':
    return f'{collection}/{path}/depthwise_kernel', depthwise_to_ours
  return f'{collection}/{path}/{tf_var}', None


def map_layer(role: str, path: str, sub: str
              ) -> tuple[str, Transform | None] | None:
  """Maps `sub` (the key inside a top-level layer, e.g. '_conv1/kernel').

  None where a layer of that role has no such variable.
  """
  if role in BLOCK_ROLES:
    table = BLOCK_SUBLAYERS[role]
    for attr in sorted(table, key=len, reverse=True):
      if sub.startswith(attr + '/'):
        return leaf('params', f'{path}/{table[attr]}', sub[len(attr) + 1:])
    return None
  if '/' in sub:
    return None
  return leaf('params', path, sub)
