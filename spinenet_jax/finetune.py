"""Fine-tuning: start a fresh run from another run's variables.

`config.init_from` names a run directory (ours, or one written by
`python -m spinenet_jax.convert_model_garden`; a step directory
`WORKDIR/checkpoints/<step>` picks the step) and `config.init_from_parts`
what to take from it:

- `'backbone'`: the SpineNet backbone's params and batch statistics; the
  rest (the RetinaNet head, the classifier head) starts fresh;
- `'backbone+head'`: everything whose shape matches. Variables whose shape
  differs, such as the class predictor when `num_classes` differs, are
  re-initialised and listed.

The backbone must match exactly (a missing variable or another shape is an
error naming it): half a backbone restored would train, silently worse.
Only a run's first start loads `init_from`; a resumed run continues from
its own checkpoints. The source's EMA weights are taken when it kept them,
as `load_checkpoint` does; its optimizer state never is.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

PARTS = ('backbone', 'backbone+head')
BACKBONE = 'backbone'  # Name of the backbone submodule in models.py.


class FineTuneError(ValueError):
  """`init_from` cannot initialise this model; names the variable."""


def _path(keys: tuple[str, ...]) -> str:
  return '/'.join(keys)


def merge(fresh: dict[str, Any], source: dict[str, Any], parts: str
          ) -> tuple[dict[str, Any], dict[str, int], list[str]]:
  """Fresh variables with the chosen parts of `source` put in.

  Returns:
    The merged variables ({'params', 'batch_stats'}), the number of arrays
    restored per part ('backbone', 'head'), and the re-initialised
    variables as 'collection/path: source shape -> new shape'.
  """
  if parts not in PARTS:
    raise FineTuneError(f'config.init_from_parts={parts!r}: use one of '
                        f'{PARTS}.')
  merged, counts, reinit = {}, {'backbone': 0, 'head': 0}, []
  for collection, tree in fresh.items():
    flat_src = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(source.get(collection, {})))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for keys, value in flat.items():
      part = 'backbone' if keys[0] == BACKBONE else 'head'
      if part == 'head' and parts == 'backbone':
        continue
      src = flat_src.get(keys)
      same = src is not None and np.shape(src) == np.shape(value)
      if part == 'backbone' and not same:
        raise FineTuneError(
            f'config.init_from has another backbone: {collection}/'
            f'{_path(keys)} is '
            f'{"missing" if src is None else np.shape(src)} there and '
            f'{np.shape(value)} here. Use a run of the same model_id and '
            'widths, or train without init_from.')
      if not same:
        reinit.append(f'{collection}/{_path(keys)}: '
                      f'{"missing" if src is None else np.shape(src)} -> '
                      f'{np.shape(value)}')
        continue
      flat[keys] = np.asarray(src, np.asarray(value).dtype) if (
          hasattr(src, 'dtype')) else src
      counts[part] += 1
    merged[collection] = flax.traverse_util.unflatten_dict(flat)
  return merged, counts, reinit


def source_variables(init_from: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `init_from` on the host (EMA if kept)."""
  from spinenet_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    run = inference.load_checkpoint(init_from)
  except FileNotFoundError as e:
    raise FineTuneError(f'config.init_from={init_from!r}: {e}') from e
  return jax.device_get(run.variables)


def initialise(state: Any, config: ml_collections.ConfigDict, tx: Any,
               shardings: Any, log: Callable[[str], None] = print) -> Any:
  """A fresh train state with `config.init_from`'s variables put in (the
  state unchanged when it is unset)."""
  if not config.get('init_from'):
    return state
  fresh = jax.device_get({'params': state.params,
                          'batch_stats': state.batch_stats})
  merged, counts, reinit = merge(fresh, source_variables(config.init_from),
                                 config.get('init_from_parts') or PARTS[1])
  params = merged['params']
  new = state.replace(params=params, batch_stats=merged['batch_stats'],
                      opt_state=tx.init(params),
                      ema_params=params if state.ema_params is not None
                      else None)
  log(f'Initialised from {config.init_from} '
      f'({config.get("init_from_parts") or PARTS[1]}): restored '
      f'{counts["backbone"]} backbone and {counts["head"]} other arrays; '
      f'{len(reinit)} re-initialised' + (':\n  ' + '\n  '.join(reinit)
                                         if reinit else '.'))
  return jax.device_put(new, shardings)
