"""Search a scale-permuted backbone: regularized evolution on a proxy task.

  python -m spinenet_jax.search --config=configs/search_shapes.py \
      --workdir=runs/search [--config.search.num_trials=30 ...]

Run the same command in more processes (other device groups, other hosts;
there set --config.search.storage to one PostgreSQL URL) and they share the
search. Stop it at any time (even with SIGKILL) and run it again: it goes on
from its storage and never retrains a finished trial. At the end it writes
`best_block_specs.py` (a training config: `train.py --config=` it, or copy
its BLOCK_SPECS into `--config.model.block_specs=`), `best_block_specs.json`,
and pictures of the best networks beside SpineNet-49.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spinenet_jax import evaluation  # noqa: E402
from spinenet_jax import models  # noqa: E402
from spinenet_jax import specs  # noqa: E402
from spinenet_jax.search import evolution  # noqa: E402
from spinenet_jax.search import proxy  # noqa: E402
from spinenet_jax.search import results  # noqa: E402
from spinenet_jax.search import space as space_lib  # noqa: E402
from spinenet_jax.search import study as study_lib  # noqa: E402
from spinenet_jax.search.space import Genotype, SearchSpace  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Search config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Trial storage, trials and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def check_config(config, space: SearchSpace) -> None:
  """Raises a ValueError for a config that cannot run, before any trial."""
  cfg = config.search
  evolution.Algorithm(cfg.algorithm, cfg.population_size, cfg.tournament_size,
                      cfg.reject_dead)
  if cfg.objective not in ('proxy', 'toy'):
    raise ValueError(f"search.objective={cfg.objective!r}: expected 'proxy' "
                     "or 'toy'.")
  if cfg.num_trials < 1:
    raise ValueError(f'search.num_trials={cfg.num_trials}: need at least 1.')
  mobile = specs.is_mobile(config.trial.model.model_id)
  if mobile != (space.family == 'spinenet_mobile'):
    raise ValueError(
        f'space.family={space.family!r} but trial.model.model_id='
        f'{config.trial.model.model_id!r}: use a *_mobile model id with '
        "family 'spinenet_mobile' and a SpineNet id otherwise.")
  size = config.trial.data.image_size
  top = max(space.max_level, space.max_block_level)
  if size % 2 ** top:
    raise ValueError(f'trial.data.image_size={size} must divide by 2**{top} '
                     f'= {2 ** top} (the deepest level a block can have).')
  model = models.build_model(config.trial)
  if (space.min_level, space.max_level) != (model.min_level, model.max_level):
    raise ValueError(
        f'space.output_levels {space.output_levels} must be the model\'s '
        f'endpoint levels {model.min_level}..{model.max_level}.')
  if cfg.metric not in evaluation.COCO_METRICS:
    raise ValueError(f'search.metric={cfg.metric!r}: expected one of '
                     f'{evaluation.COCO_METRICS}.')
  if cfg.grace_s < 2 * cfg.heartbeat_s:
    raise ValueError(
        f'search.grace_s={cfg.grace_s} must be at least twice heartbeat_s='
        f'{cfg.heartbeat_s}, or live workers lose their trials.')
  if cfg.objective == 'toy' and space.num_blocks != 15:
    raise ValueError("objective='toy' measures the distance to SpineNet-49, "
                     'so it needs a 15-block space.')


def evaluator(config, workdir: str, space: SearchSpace):
  """evaluate(genotype, trial) -> {'reward', ...} for config.search.objective."""
  cfg = config.search
  audit = os.path.join(workdir, 'evaluations.log')

  def start(trial) -> None:  # One line per training started, for audits.
    with open(audit, 'a') as f:
      f.write(f'{trial.number} {trial.user_attrs["hash"]} '
              f'{socket.gethostname()}:{os.getpid()}\n')

  def toy(g: Genotype, trial) -> dict:
    start(trial)
    time.sleep(cfg.toy_seconds)
    return {'reward': evolution.toy_reward(specs.SPINENET_BLOCK_SPECS[:15])(g)}

  def train(g: Genotype, trial) -> dict:
    start(trial)
    c = proxy.trial_config(config.trial, g.block_specs())
    r = proxy.train(c, os.path.join(workdir, 'trials', trial.user_attrs['hash']),
                    metric=cfg.metric, target_macs=cfg.target_macs,
                    macs_weight=cfg.macs_weight)
    out = {'reward': r.reward, 'macs': r.macs, 'params': r.params,
           'seconds': round(r.seconds, 1), **r.metrics}
    if r.error:
      out['error'] = r.error
    return out

  return toy if cfg.objective == 'toy' else train


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = FLAGS.config, FLAGS.workdir
  space = space_lib.from_config(config.space)
  check_config(config, space)
  os.makedirs(workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # Retries, retrains hit it.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(os.path.abspath(workdir), 'xla_cache'))
  study = study_lib.open_study(workdir, config.search)
  reporter = results.Reporter(study, workdir, config.search.num_trials)
  try:
    size = f'{space_lib.size(space)["total"]:.3g} genotypes'
  except ValueError:  # Levels out of range are rejected, not counted.
    size = 'a space'
  print(f'Search in {workdir}: {reporter.done()} of '
        f'{config.search.num_trials} trials finished; '
        f'{config.search.algorithm} over {size}.', flush=True)
  if not study_lib.work(study, workdir, config.search, space,
                        evaluator(config, workdir, space), reporter.line):
    print('SIGTERM: the running trial was saved and queued again; run the '
          'same command to go on.', flush=True)
    return 0
  results.write(study, workdir, config, space)
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
