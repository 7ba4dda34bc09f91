"""Reading a TF2 object-based checkpoint: its arrays and variable names."""

from __future__ import annotations

import numpy as np

# Suffix of every variable key in an object-based TF checkpoint.
ATTR = '/.ATTRIBUTES/VARIABLE_VALUE'


def strip_attr(key: str) -> str:
  """A checkpoint key without its ATTR suffix ('a/b' + ATTR -> 'a/b')."""
  return key[:-len(ATTR)]


def read_tf_checkpoint(prefix: str) -> tuple[dict[str, np.ndarray],
                                             dict[str, str]]:
  """(checkpoint key -> array, checkpoint key -> variable full name).

  Optimizer slots, the optimizer's own variables, the save counter and the
  global step are left out. The full names (e.g. 'conv2d_5/kernel') come
  from the checkpoint's trackable object graph.
  """
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
