"""Architecture search on the shapes data: proxy noise, a search, retraining.

  python benchmarks/search_shapes.py --workdir=runs/bench_search \
      [--stages=noise,search,long] [--num_trials=30] [--long_scale=4] \
      [--long_only=evolution_best,random_best]

Stages (each resumes: a finished training is read back from its workdir):
- noise: the proxy reward over 3 seeds for SpineNet-49-proxy and 2 random
  specs; prints each one's coefficient of variation (std / mean).
- search: regularized evolution and random search, `num_trials` each, with
  `python -m spinenet_jax.search` (so they resume too).
- long: `long_scale` x longer training of the scale-decreased ResNet-50
  seed, SpineNet-49-proxy, the random specs and each search's best; their
  AP on the held-out split against their proxy reward gives Kendall's tau,
  and their AP on the validation split is the final table. A search's best
  is not retrained for its proxy reward: its trial was that same training
  (seed 0, the proxy budget). `--long_only` trains only the named rows.
Figures go to WORKDIR/summary.json and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import search_shapes  # noqa: E402
from spinenet_jax import specs  # noqa: E402
from spinenet_jax.search import evolution  # noqa: E402
from spinenet_jax.search import proxy  # noqa: E402

SPINENET49 = [tuple(s) for s in specs.SPINENET_BLOCK_SPECS[:15]]


def scale_decreased_seed() -> list[tuple]:
  """ResNet-50's blocks as a block spec: levels in increasing order, each
  block reading the two features before it, outputs the last of each level
  3..7 (the paper's R0-SP53 seed before permutation; all bottlenecks)."""
  levels = sorted(search_shapes.get_config().space.intermediate_levels +
                  (3, 4, 5, 6, 7))
  last = {l: i for i, l in enumerate(levels)}
  return [(l, 'bottleneck', (i, i + 1), l >= 3 and last[l] == i)
          for i, l in enumerate(levels)]


def random_specs(n: int, seed: int = 0) -> list[list[tuple]]:
  rng = np.random.default_rng(seed)
  return [[tuple(s) for s in evolution.sample_new(rng).block_specs()]
          for _ in range(n)]


def train(workdir: Path, name: str, block_specs, seed: int = 0,
          scale: float = 1.0, split: str | None = None) -> dict:
  """One training (cached in WORKDIR/runs/NAME/result[-split].json)."""
  run = workdir / 'runs' / name
  cache = run / f'result{"-" + split if split else ""}.json'
  if cache.exists():
    return json.loads(cache.read_text())
  base = search_shapes.get_config().trial
  config = proxy.trial_config(base, block_specs, seed=seed, steps_scale=scale)
  if split:
    with config.unlocked():
      config.data.eval_split = split
  r = proxy.train(config, str(run))
  out = {'name': name, 'seed': seed, 'scale': scale, 'reward': r.reward,
         'AP': r.metrics.get('AP'), 'AP50': r.metrics.get('AP50'),
         'macs': r.macs, 'params': r.params, 'seconds': round(r.seconds, 1),
         'error': r.error, 'block_specs': [list(s) for s in block_specs]}
  cache.write_text(json.dumps(out) + '\n')
  print(f'{name}: AP {out["AP"]} ({out["seconds"]} s)', flush=True)
  return out


def stage_noise(workdir: Path) -> dict:
  rows = {}
  for name, bs in [('spinenet49_proxy', SPINENET49),
                   *((f'random{i}', s) for i, s in enumerate(random_specs(2)))]:
    rewards = [train(workdir, f'{name}-s{seed}', bs, seed)['reward']
               for seed in range(3)]
    rows[name] = {'rewards': rewards,
                  'cv': float(np.std(rewards) / max(np.mean(rewards), 1e-9))}
    print(f'noise {name}: {rewards} CV {rows[name]["cv"]:.3f}', flush=True)
  return rows


def stage_search(workdir: Path, num_trials: int) -> dict:
  out = {}
  for algorithm in ('evolution', 'random'):
    d = workdir / algorithm
    subprocess.run([sys.executable, '-m', 'spinenet_jax.search',
                    f'--config={REPO / "configs" / "search_shapes.py"}',
                    f'--workdir={d}', f'--config.search.algorithm={algorithm}',
                    f'--config.search.num_trials={num_trials}'],
                   cwd=REPO, check=True)
    best = json.loads((d / 'best_block_specs.json').read_text())
    out[algorithm] = {'best_reward': best['reward'], 'trial': best['trial'],
                      'block_specs': best['block_specs']}
  return out


def kendall_tau(x, y) -> float:
  """Kendall's tau-a of two equally long sequences."""
  n, s = len(x), 0
  for i in range(n):
    for j in range(i + 1, n):
      s += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
  return float(s / (n * (n - 1) / 2))


def stage_long(workdir: Path, scale: float, search: dict,
               only: list[str] | None = None) -> dict:
  named = [('scale_decreased_r50', scale_decreased_seed()),
           ('spinenet49_proxy', SPINENET49),
           *((f'random{i}', s) for i, s in enumerate(random_specs(3)))]
  named += [(f'{a}_best', search[a]['block_specs']) for a in search]
  rewards = {f'{a}_best': search[a]['best_reward'] for a in search}
  if only:
    unknown = set(only) - {n for n, _ in named}
    if unknown:
      raise SystemExit(f'--long_only: unknown rows {sorted(unknown)}; '
                       f'rows are {[n for n, _ in named]}')
    named = [(n, bs) for n, bs in named if n in only]
  rows = {}
  for name, bs in named:
    reward = (rewards[name] if name in rewards
              else train(workdir, f'{name}-s0', bs, 0)['reward'])
    long = train(workdir, f'{name}-long', bs, 0, scale)
    val = train(workdir, f'{name}-long', bs, 0, scale, split='validation')
    rows[name] = {'proxy_reward': reward, 'long_heldout_AP':
                  long['AP'], 'validation_AP': val['AP'],
                  'validation_AP50': val['AP50'], 'macs': long['macs'],
                  'params': long['params']}
  proxy_r = [r['proxy_reward'] for r in rows.values()]
  long_r = [r['long_heldout_AP'] for r in rows.values()]
  tau = kendall_tau(proxy_r, long_r) if len(rows) > 1 else None
  return {'rows': rows, 'kendall_tau': tau}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--stages', default='noise,search,long')
  p.add_argument('--num_trials', type=int, default=30)
  p.add_argument('--long_scale', type=float, default=4.0)
  p.add_argument('--long_only', default='',
                 help='comma-separated rows of the long stage to train')
  args = p.parse_args()
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'summary.json'
  summary = json.loads(path.read_text()) if path.exists() else {}
  stages = args.stages.split(',')
  if 'noise' in stages:
    summary['noise'] = stage_noise(workdir)
  if 'search' in stages:
    summary['search'] = stage_search(workdir, args.num_trials)
  if 'long' in stages:
    summary['long'] = stage_long(workdir, args.long_scale,
                                 summary.get('search', {}),
                                 [n for n in args.long_only.split(',') if n])
  path.write_text(json.dumps(summary, indent=1) + '\n')
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
