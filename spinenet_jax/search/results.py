"""What a search shows: a line per trial, TensorBoard, the best networks.

`write` leaves in the workdir `best_block_specs.py` (a training config:
`train.py --config=WORKDIR/best_block_specs.py`; its `BLOCK_SPECS` also go
into `--config.model.block_specs=...`), `best_block_specs.json` (specs, hash,
reward; `draw --diff` reads it) and `top{k}_vs_spinenet49.png`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import optuna

from spinenet_jax import draw
from spinenet_jax.metric_writer import MetricWriter
from spinenet_jax.search import study as study_lib
from spinenet_jax.search.space import SearchSpace


def _si(value: float | None, unit: str = '') -> str:
  if value is None:
    return '-'
  for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.2f}{suffix}{unit}'
  return f'{value:g}{unit}'


class Reporter:
  """Prints one line per finished trial and writes its TensorBoard scalars."""

  def __init__(self, study: optuna.Study, workdir: str, num_trials: int):
    self.study, self.num_trials = study, num_trials
    self.t0, self.done0 = time.time(), self.done()
    name = f'{socket.gethostname()}-{os.getpid()}'
    self.writer = MetricWriter(os.path.join(workdir, 'workers', name))

  def done(self) -> int:
    return len(study_lib.finished(self.study))

  def line(self, t: optuna.trial.FrozenTrial) -> None:
    trials = study_lib.finished(self.study)
    best = max(trials, key=lambda b: b.value)
    hours = (time.time() - self.t0) / 3600
    rate = (len(trials) - self.done0) / hours if hours > 0 else 0.0
    left = max(self.num_trials - len(trials), 0)
    eta = f'{left / rate:.2f} h' if rate > 0 else '-'
    a = t.user_attrs
    error = f'  ({a["error"][:60]})' if a.get('error') else ''
    print(f'trial {t.number:4d}  {a["hash"]}  MACs {_si(a.get("macs"))}  '
          f'params {_si(a.get("params"))}  reward {t.value:.4f}  best '
          f'{best.value:.4f} (trial {best.number})  {rate:.1f} trials/h  '
          f'ETA {eta}  [{len(trials)}/{self.num_trials}]{error}', flush=True)
    scalars = {'reward': t.value, 'best_reward': best.value}
    scalars.update({k: a[k] for k in ('macs', 'params', 'AP', 'AP50',
                                      'seconds') if k in a})
    self.writer.write(t.number, scalars)


def top(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
  """The k best finished trials, best first (ties: the earlier)."""
  return sorted(study_lib.finished(study),
                key=lambda t: (-t.value, t.number))[:k]


def _atomic_write(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def specs_literal(block_specs: list) -> str:
  """Block specs as a Python literal, one block per line."""
  rows = [f'    ({l}, {fn!r}, ({p[0]}, {p[1]}), {bool(o)}),'
          for l, fn, p, o in block_specs]
  return '(\n' + '\n'.join(rows) + '\n)'


def best_config_text(t: optuna.trial.FrozenTrial, config: Any) -> str:
  """`best_block_specs.py`: the specs and a training config that uses them."""
  literal = specs_literal(study_lib.claim_of(t)['block_specs'])
  return f'''"""Best of a SpineNet search: trial {t.number}, hash {t.user_attrs['hash']}, \
reward {t.value:.4f}.

  python train.py --config=best_block_specs.py --workdir=runs/best
  python train.py --config=configs/demo.py --config.model.block_specs="..."

get_config() is the search's proxy training config (config.trial) with these
block specs; override any field as usual (e.g. a longer --config.total_steps).
"""

import ml_collections

BLOCK_SPECS = {literal}

CONFIG = {config.trial.to_json()!r}


def get_config() -> ml_collections.ConfigDict:
  import json
  c = ml_collections.ConfigDict(json.loads(CONFIG))
  c.model.block_specs = BLOCK_SPECS
  return c
'''


def write(study: optuna.Study, workdir: str, config: Any,
          space: SearchSpace) -> list[optuna.trial.FrozenTrial]:
  """Writes the best specs and pictures; prints the top trials."""
  best = top(study, config.search.top_k)
  if not best:
    return best
  b = best[0]
  _atomic_write(os.path.join(workdir, 'best_block_specs.json'), json.dumps({
      'model_id': config.trial.model.model_id, 'trial': b.number,
      'hash': b.user_attrs['hash'], 'reward': b.value,
      'block_specs': study_lib.claim_of(b)['block_specs'],
      'top': [{'trial': t.number, 'hash': t.user_attrs['hash'],
               'reward': t.value, 'block_specs': study_lib.claim_of(t)['block_specs']}
              for t in best]}, indent=1) + '\n')
  _atomic_write(os.path.join(workdir, 'best_block_specs.py'),
                best_config_text(b, config))
  reference = draw.graph('49_mobile' if space.family == 'spinenet_mobile'
                         else '49')
  print(f'Best {len(best)} of {len(study_lib.finished(study))} trials:')
  for rank, t in enumerate(best, 1):
    g = draw.graph(config.trial.model.model_id, study_lib.claim_of(t)['block_specs'],
                   space.min_level, space.max_level,
                   title=f'#{rank}: trial {t.number}, reward {t.value:.4f}')
    path = os.path.join(workdir, f'top{rank}_vs_spinenet49.png')
    tmp = f'{path}.{os.getpid()}.png'  # Workers finishing together.
    d = draw.draw_diff(g, reference, tmp)
    os.replace(tmp, path)
    print(f'  #{rank} trial {t.number} {t.user_attrs["hash"]} reward '
          f'{t.value:.4f}: {path} ({d.summary} from SpineNet-49)')
  print(f'Wrote {workdir}/best_block_specs.py and best_block_specs.json.')
  return best
