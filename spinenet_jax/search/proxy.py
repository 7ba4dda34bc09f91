"""The proxy task: train a candidate with the library's own loop, score it.

A trial is `train_lib.train_and_evaluate` on `config.trial` (a training
config at proxy scale) with the candidate's block specs, evaluated on a
held-out part of the *training* split (Du et al. held out 7,392 COCO train
images); the validation split is kept for the final report. The reward is
COCO AP, optionally penalised by multiply-adds as in MnasNet:
`AP * min(1, target / MACs) ** w`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Sequence

import ml_collections

from spinenet_jax import models
from spinenet_jax import summary


class Preempted(Exception):
  """SIGTERM stopped the training after saving a checkpoint."""


@dataclasses.dataclass(frozen=True)
class Result:
  """What one proxy training measured."""
  reward: float
  metrics: dict[str, float]
  macs: int
  params: int
  seconds: float
  error: str | None = None


def trial_config(base: ml_collections.ConfigDict, block_specs: Sequence[Any],
                 seed: int | None = None,
                 steps_scale: float = 1.0) -> ml_collections.ConfigDict:
  """`base` with the candidate's specs (and a seed, a longer budget)."""
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.model.block_specs = tuple(tuple(s) for s in block_specs)
    if seed is not None:
      c.seed = int(seed)
    if steps_scale != 1.0:
      c.total_steps = int(round(c.total_steps * steps_scale))
      if c.optimizer.get('warmup_steps'):
        c.optimizer.warmup_steps = int(round(c.optimizer.warmup_steps *
                                             steps_scale))
  return c


def size_of(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(multiply-adds per image, trainable params) of the config's model."""
  s = summary.summarize(models.build_model(config), config.data.image_size)
  return s['macs'], s['params']


def reward_of(metric: float, macs: int, target_macs: float | None,
              weight: float) -> float:
  """The metric, times min(1, target / MACs) ** weight when a target is set."""
  if not target_macs or not weight:
    return float(metric)
  return float(metric) * min(1.0, target_macs / macs) ** weight


def train(config: ml_collections.ConfigDict, workdir: str, *,
          metric: str = 'AP', target_macs: float | None = None,
          macs_weight: float = 0.0) -> Result:
  """Trains `config` into `workdir` (resuming there), returns its Result.

  The run's console goes to `workdir/train.log`. A diverged run (non-finite
  loss) scores 0 with its error recorded rather than stopping the search.
  """
  from spinenet_jax import train_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  macs, params = size_of(config)
  os.makedirs(workdir, exist_ok=True)
  error, metrics, out = None, {}, {}
  with open(os.path.join(workdir, 'train.log'), 'a') as log, \
      contextlib.redirect_stdout(log):
    try:
      out = train_lib.train_and_evaluate(config, workdir)
      metrics = {k: float(v) for k, v in out.items()
                 if isinstance(v, (int, float))}
    except train_lib.NonFiniteLossError as e:
      error = str(e)
  if out.get('preempted'):
    raise Preempted(f'SIGTERM at step {out["step"]}; saved in {workdir}.')
  if error is None and metric not in metrics:
    raise KeyError(f'The trial reported no {metric!r} (it has '
                   f'{sorted(metrics)}); set config.search.metric.')
  value = 0.0 if error else metrics[metric]
  return Result(reward_of(value, macs, target_macs, macs_weight), metrics,
                macs, params, time.time() - t0, error)
