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

Modules: `tf_checkpoint` reads the checkpoint; `layout` lists the layers
Model Garden creates, in creation order, per role; `matching` locates the
backbone and head in the checkpoint and pairs their variables with ours
(how, in its docstring); `conversion` builds our config and model, checks
every variable (a mismatch, a missing or an unexpected variable is reported
by name in one ConversionError) and writes the run; `__main__` is the
command line.

Not semantically identical: Model Garden's image classifier pools only the
top endpoint (level 7) before its Dense layer, while our `Classifier` averages
levels 3..7; `--task=classification` converts the weights and warns.
"""

from __future__ import annotations

from typing import Any

from spinenet_jax.convert_model_garden.conversion import build_config
from spinenet_jax.convert_model_garden.conversion import convert
from spinenet_jax.convert_model_garden.conversion import convert_arrays
from spinenet_jax.convert_model_garden.conversion import default_image_size
from spinenet_jax.convert_model_garden.conversion import fresh_head
from spinenet_jax.convert_model_garden.conversion import infer_model_fields
from spinenet_jax.convert_model_garden.conversion import write_run
from spinenet_jax.convert_model_garden.layout import BLOCK_ROLES
from spinenet_jax.convert_model_garden.layout import BN_ROLE
from spinenet_jax.convert_model_garden.layout import expected_backbone_layers
from spinenet_jax.convert_model_garden.matching import ConversionError
from spinenet_jax.convert_model_garden.matching import find_backbone_root
from spinenet_jax.convert_model_garden.matching import find_head_root
from spinenet_jax.convert_model_garden.matching import map_backbone
from spinenet_jax.convert_model_garden.matching import map_classifier_head
from spinenet_jax.convert_model_garden.matching import map_retinanet_head
from spinenet_jax.convert_model_garden.tf_checkpoint import ATTR
from spinenet_jax.convert_model_garden.tf_checkpoint import read_tf_checkpoint

__all__ = [
    'ATTR', 'BLOCK_ROLES', 'BN_ROLE', 'ConversionError', 'build_config',
    'convert', 'convert_arrays', 'default_image_size', 'define_flags',
    'expected_backbone_layers', 'find_backbone_root', 'find_head_root',
    'fresh_head', 'infer_model_fields', 'main', 'map_backbone',
    'map_classifier_head', 'map_retinanet_head', 'read_tf_checkpoint',
    'write_run',
]


def __getattr__(name: str) -> Any:
  # `main` and `define_flags` live in __main__, imported on first use: an
  # eager import here would make `python -m` find the module already loaded
  # (runpy's RuntimeWarning) and run a second copy of it.
  if name in ('main', 'define_flags'):
    from spinenet_jax.convert_model_garden import __main__ as cli  # pylint: disable=g-import-not-at-top
    return getattr(cli, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
