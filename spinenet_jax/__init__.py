"""spinenet_jax: SpineNet backbones, RetinaNet and classifiers in JAX/Flax."""

from __future__ import annotations

from spinenet_jax.inference import load_checkpoint
from spinenet_jax.models import Classifier, RetinaNet, build_model
from spinenet_jax.spinenet import SpineNet
from spinenet_jax.spinenet_mobile import SpineNetMobile

__all__ = ['SpineNet', 'SpineNetMobile', 'RetinaNet', 'Classifier', 'build_model',
           'load_checkpoint']
