"""spinenet_jax: SpineNet backbones, RetinaNet and classifiers in JAX/Flax.

The names below load on first use, so that `import spinenet_jax.host_memory`
(which `train.py` runs before anything else) does not import JAX and Flax.
"""

from __future__ import annotations

import importlib

_NAMES = {
    'load_checkpoint': 'spinenet_jax.inference',
    'Classifier': 'spinenet_jax.models',
    'RetinaNet': 'spinenet_jax.models',
    'build_model': 'spinenet_jax.models',
    'SpineNet': 'spinenet_jax.spinenet',
    'SpineNetMobile': 'spinenet_jax.spinenet_mobile',
}
__all__ = ['SpineNet', 'SpineNetMobile', 'RetinaNet', 'Classifier', 'build_model',
           'load_checkpoint']


def __getattr__(name: str):
  if name in _NAMES:
    return getattr(importlib.import_module(_NAMES[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
