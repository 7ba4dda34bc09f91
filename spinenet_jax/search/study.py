"""Trial storage and workers: an Optuna study shared by every worker.

Each worker is a process (one per host or device group) running `work`: it
proposes the next genotype from the finished trials in the storage, trains
it and records the result. Optuna's RDB storage (SQLite in the workdir by
default, PostgreSQL or MySQL for many hosts) keeps every trial durably and
hands out work atomically; its heartbeat marks the trial of a worker that
died (SIGKILL, a lost host) as failed after `grace_s`, and a retry callback
queues the same genotype for the next free worker. A restarted search reads
its history back and never retrains a finished trial.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from typing import Any, Callable

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from spinenet_jax.search import evolution
from spinenet_jax.search import graph
from spinenet_jax.search.proxy import Preempted
from spinenet_jax.search.space import Genotype, SearchSpace

Evaluate = Callable[[Genotype, optuna.Trial], dict[str, Any]]
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


def open_study(workdir: str, cfg: Any) -> optuna.Study:
  """The search's study (`config.search`): created once, then shared."""
  os.makedirs(workdir, exist_ok=True)
  url = cfg.storage or f'sqlite:///{os.path.abspath(workdir)}/search.db'
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  for attempt in range(5):
    try:
      storage = optuna.storages.RDBStorage(
          url, engine_kwargs={'connect_args': {'timeout': 60}}
          if url.startswith('sqlite') else None,
          heartbeat_interval=int(cfg.heartbeat_s),
          grace_period=int(cfg.grace_s),
          heartbeat_stale_trial_callback=(
              optuna.storages.RetryHeartbeatStaleTrialCallback(
                  max_retry=cfg.max_retries)))
      return optuna.create_study(study_name='spinenet_search',
                                 storage=storage, direction='maximize',
                                 load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError,
            optuna.exceptions.StorageInternalError):
      # Workers starting together race to create the tables or the study;
      # the loser finds them made.
      if attempt == 4:
        raise
      time.sleep(1 + attempt)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
  """Completed trials in the order they completed."""
  done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  return sorted(done, key=lambda t: (t.datetime_complete, t.number))


def history(study: optuna.Study) -> list[evolution.Trial]:
  """The finished trials as the algorithms see them."""
  return [evolution.Trial(genotype_of(t), float(t.value), claim_of(t)['hash'])
          for t in finished(study)]


def claim_of(t: optuna.trial.FrozenTrial | optuna.Trial) -> dict[str, Any]:
  """{'genotype', 'block_specs', 'hash'} of a trial that claimed a network."""
  return t.user_attrs['claim']


def genotype_of(t: optuna.trial.FrozenTrial | optuna.Trial) -> Genotype:
  g = claim_of(t)['genotype']
  return Genotype(tuple(g['base_levels']), tuple(g['deltas']),
                  tuple(g['output_levels']), tuple(g['block_fns']),
                  tuple(tuple(p) for p in g['parents']))


def _live(t: optuna.trial.FrozenTrial) -> bool:
  return t.state not in (TrialState.FAIL, TrialState.PRUNED)


def _claim(trial: optuna.Trial, study: optuna.Study, space: SearchSpace,
           algorithm: evolution.Algorithm, seed: int) -> Genotype:
  """The new trial's genotype, unique among the study's networks.

  A worker writes its proposal's hash, then looks: if any other live trial
  has that hash it proposes again (so does the other, if it looked later),
  so no network is trained twice. Only then is the claim written, in one
  attribute, so a retry never sees half of it.
  """
  for attempt in range(evolution.MAX_TRIES):
    seen = frozenset(t.user_attrs['hash'] for t in study.get_trials(
        deepcopy=False) if t.number != trial.number and _live(t)
                     and 'hash' in t.user_attrs)
    rng = np.random.default_rng([seed, trial.number, attempt])
    g = evolution.propose(history(study), rng, algorithm, space, seen)
    h = graph.canonical_hash(g.block_specs(), space)
    trial.set_user_attr('hash', h)
    if not any(t.number != trial.number and _live(t) and
               t.user_attrs.get('hash') == h
               for t in study.get_trials(deepcopy=False)):
      trial.set_user_attr('claim', {
          'hash': h, 'block_specs': [list(s) for s in g.block_specs()],
          'genotype': {'base_levels': g.base_levels, 'deltas': g.deltas,
                       'output_levels': g.output_levels,
                       'block_fns': g.block_fns, 'parents': g.parents}})
      return g
  raise RuntimeError(f'Trial {trial.number}: no unclaimed network in '
                     f'{evolution.MAX_TRIES} proposals.')


def _over_budget(study: optuna.Study, trial: optuna.Trial,
                 num_trials: int) -> bool:
  trials = study.get_trials(deepcopy=False)
  done = sum(t.state == TrialState.COMPLETE for t in trials)
  ahead = sum(t.state in ACTIVE and t.number < trial.number for t in trials)
  return done + ahead >= num_trials


def _superseded(study: optuna.Study, trial: optuna.Trial) -> bool:
  """A retry whose network another live, earlier trial already has (two
  workers may both fail one stale trial and queue two retries)."""
  h = claim_of(trial)['hash']
  return any(t.number < trial.number and _live(t) and
             t.user_attrs.get('hash') == h
             for t in study.get_trials(deepcopy=False))


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
  """Queues `trial`'s network again (as the heartbeat retry does)."""
  study.add_trial(optuna.create_trial(
      state=TrialState.WAITING, user_attrs=dict(trial.user_attrs),
      system_attrs={'failed_trial': trial.number}))


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())


def work(study: optuna.Study, workdir: str, cfg: Any, space: SearchSpace,
         evaluate: Evaluate, report: Callable[[optuna.trial.FrozenTrial],
                                              None] = lambda t: None,
         poll_s: float = 2.0) -> bool:
  """Runs trials until the study has `cfg.num_trials` finished ones.

  `evaluate(genotype, trial)` returns {'reward', ...}, all stored with the
  trial, or raises Preempted. `report` sees each trial this worker finishes.
  Returns True when the budget is done, False when preempted.
  """
  algorithm = evolution.Algorithm(cfg.algorithm, cfg.population_size,
                                  cfg.tournament_size, cfg.reject_dead)
  log_path = os.path.join(workdir, 'trials.jsonl')
  worker = f'{socket.gethostname()}:{os.getpid()}'

  current = []  # The number of the trial this worker is running.

  def objective(trial: optuna.Trial) -> float:
    current.append(trial.number)
    if 'claim' in trial.user_attrs:  # A retry of a lost worker's trial.
      if 'reward' in trial.user_attrs:  # It finished; only the tell was lost.
        return float(trial.user_attrs['reward'])
      if _superseded(study, trial) or _over_budget(study, trial,
                                                   cfg.num_trials):
        raise optuna.TrialPruned('another trial has this network or the budget')
      g = genotype_of(trial)
    else:
      if _over_budget(study, trial, cfg.num_trials):
        raise optuna.TrialPruned('the budget is taken by other trials')
      g = _claim(trial, study, space, algorithm, cfg.seed)
    trial.set_user_attr('worker', worker)
    try:
      out = evaluate(g, trial)
    except Preempted:
      requeue(study, trial)
      raise
    for k, v in out.items():
      if k != 'reward':
        trial.set_user_attr(k, v)
    _append_jsonl(log_path, {
        'trial': trial.number, 'hash': claim_of(trial)['hash'],
        'reward': out['reward'], 'worker': worker,
        'block_specs': claim_of(trial)['block_specs'],
        **{k: v for k, v in out.items() if k != 'reward'}})
    trial.set_user_attr('reward', out['reward'])  # Last: the log has it.
    return float(out['reward'])

  while True:
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if done >= cfg.num_trials:
      return True
    if not waiting and done + running >= cfg.num_trials:
      # The rest run elsewhere, or are lost and become stale after grace_s.
      # (Optuna cannot see a worker killed before its first heartbeat.)
      time.sleep(poll_s)
      continue
    current.clear()
    try:
      study.optimize(objective, n_trials=1, catch=())
    except Preempted:
      return False
    if current:
      t = study.get_trials(deepcopy=False)[current[0]]
      if t.state == TrialState.COMPLETE:
        report(t)


logging.getLogger('optuna').setLevel(logging.WARNING)
# Heartbeats and stale-trial retries are marked experimental (since 2.8).
warnings.filterwarnings('ignore',
                        category=optuna.exceptions.ExperimentalWarning)
