"""The architecture search: space, liveness, hash, mutations, algorithms,
its storage under SIGKILL and two workers, and a tiny real search."""

import collections
import dataclasses
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spinenet_jax import specs
from spinenet_jax import spinenet
from spinenet_jax.search import evolution
from spinenet_jax.search import graph
from spinenet_jax.search import space as sp
from spinenet_jax.search import study
from configs import search_shapes
from tiny import REPO, cli_overrides

SPINENET49 = specs.SPINENET_BLOCK_SPECS[:15]  # Without the dead L2 block.
TINY_SPACE = sp.SearchSpace(intermediate_levels=(3, 3, 4), output_levels=(3,),
                            level_deltas=(0, 1), window=2)
TIMEOUT_S = 600


def test_sampled_specs_are_valid_and_build():
  rng = np.random.default_rng(0)
  genotypes = [sp.sample(rng) for _ in range(10_000)]
  for g in genotypes:
    bs = g.block_specs()
    sp.to_genotype(bs)  # Raises for anything outside the space.
    assert sorted(s.level for s in bs[10:]) == [3, 4, 5, 6, 7]
    for j, s in enumerate(bs):
      assert s.input_offsets[0] < s.input_offsets[1] < j + 2
      if j < 10:
        assert s.input_offsets[0] >= j + 2 - 5
  assert len({graph.canonical_hash(g.block_specs()) for g in genotypes}) > 9990
  # Building a network is ~0.5 s of tracing: 16 of them, seeded.
  x = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  for g in genotypes[:16]:
    m = spinenet.SpineNet(model_id='49', block_specs=g.block_specs(),
                          filter_size_scale=0.125, endpoints_num_filters=8)
    out = jax.eval_shape(
        lambda x: m.init_with_output(jax.random.key(0), x, train=False)[0], x)
    assert {k: v.shape for k, v in out.items()} == {
        l: (1, 128 >> l, 128 >> l, 8) for l in range(3, 8)}


def test_each_mutation_changes_one_gene_and_stays_valid():
  rng = np.random.default_rng(1)
  seen_ops = collections.Counter()
  for _ in range(400):
    parent = sp.sample(rng)
    op = str(rng.choice(list(evolution.MUTATIONS)))
    child = evolution.mutate_once(parent, op, rng)
    assert child is not None
    a, b = parent.genes(), child.genes()
    changed = [k for k in a if a[k] != b[k]]
    assert len(changed) == 1, (op, changed)
    if changed[0][0] == 'parents':
      assert len(set(a[changed[0]]) & set(b[changed[0]])) == 1
    seen_ops[changed[0][0]] += 1
    if evolution.acceptable(child, sp.DEFAULT, reject_dead=False):
      sp.to_genotype(child.block_specs())
    live = evolution.sample_new(rng, reject_dead=True)
    repaired = evolution.mutate(live, rng, reject_dead=True)
    assert repaired is not None and not graph.dead_blocks(
        repaired.block_specs())
    sp.to_genotype(repaired.block_specs())
  assert set(seen_ops) == {'intermediate_permutation', 'output_permutation',
                           'parents', 'delta', 'block_fn'}


def test_published_specs_members_and_dead_blocks():
  assert sp.to_genotype(SPINENET49).block_specs() == SPINENET49
  assert graph.dead_blocks(SPINENET49) == ()
  assert graph.dead_blocks(specs.SPINENET_BLOCK_SPECS) == (15,)
  _, nodes, _ = graph.built_nodes(specs.SPINENET_BLOCK_SPECS)
  assert {n.index: n.extras for n in nodes if n.extras} == {14: (11,)}
  mobile = specs.SPINENET_MOBILE_BLOCK_SPECS
  assert sp.to_genotype(mobile, sp.MOBILE).block_specs() == mobile
  assert graph.dead_blocks(mobile, sp.MOBILE) == ()
  assert graph.prune(specs.SPINENET_BLOCK_SPECS) == SPINENET49
  with pytest.raises(ValueError, match='not the seed'):  # Two L7 blocks.
    sp.to_genotype(SPINENET49[:4] + (SPINENET49[4]._replace(level=7),) +
                   SPINENET49[5:])
  with pytest.raises(ValueError, match='window'):
    sp.to_genotype(SPINENET49[:9] + (specs.BlockSpec(5, 'bottleneck', (0, 8),
                                                     False),) + SPINENET49[10:])


def test_canonical_hash_merges_isomorphic_specs():
  h = graph.canonical_hash(SPINENET49)
  # The L7 and L6 outputs (specs 13, 14) do not read each other.
  swapped = SPINENET49[:13] + (SPINENET49[14], SPINENET49[13])
  assert graph.canonical_hash(swapped) == h
  flipped = tuple(s._replace(input_offsets=s.input_offsets[::-1])
                  for s in SPINENET49)
  assert graph.canonical_hash(flipped) == h
  assert graph.canonical_hash(specs.SPINENET_BLOCK_SPECS) == h  # Dead block.
  other = SPINENET49[:11] + (SPINENET49[11]._replace(input_offsets=(4, 9)),
                             ) + SPINENET49[12:]
  assert graph.canonical_hash(other) != h
  # Twins (alike upstream) read by different blocks, then swapped.
  space = sp.SearchSpace(intermediate_levels=(3, 3, 4), output_levels=(3, 4),
                         level_deltas=(0,), window=None)
  b = specs.BlockSpec
  twins = (b(3, 'bottleneck', (0, 1), False), b(3, 'bottleneck', (0, 1), False))
  x = twins + (b(4, 'bottleneck', (1, 2), False), b(3, 'bottleneck', (3, 4), True),
               b(4, 'bottleneck', (4, 5), True))
  y = twins + (b(4, 'bottleneck', (1, 3), False), b(3, 'bottleneck', (2, 4), True),
               b(4, 'bottleneck', (4, 5), True))
  assert graph.canonical_hash(x, space) == graph.canonical_hash(y, space)
  retyped = SPINENET49[:1] + (SPINENET49[1]._replace(block_fn='bottleneck'),
                              ) + SPINENET49[2:]
  assert graph.canonical_hash(retyped) != h


def test_closed_form_size_equals_enumeration():
  counts = sp.size(TINY_SPACE)
  genotypes = set(sp.enumerate_genotypes(TINY_SPACE))
  # 3 level orders x 2^3 deltas x 1 output order x 2^4 types x 1*1*1*10
  # parent pairs.
  assert counts['total'] == len(genotypes) == 3 * 8 * 1 * 16 * 10
  rng = np.random.default_rng(0)
  assert all(sp.sample(rng, TINY_SPACE) in genotypes for _ in range(200))
  hashes = {graph.canonical_hash(g.block_specs(), TINY_SPACE)
            for g in genotypes}
  assert len(hashes) < len(genotypes)  # Isomorphic networks merged.
  full = sp.size()
  assert full['intermediate_permutations'] == 5040
  assert full['level_adjustments'] == 4 ** 10 and full['block_types'] == 2 ** 15
  assert full['connections'] == 1_062_485_424_000_000_000  # Window of 5.


def test_evolution_beats_random_search_on_a_toy_reward():
  reward = evolution.toy_reward(SPINENET49)
  evo, rnd = [], []
  for seed in range(5):
    e = evolution.run(reward, 200, seed, evolution.Algorithm('evolution', 16, 4))
    r = evolution.run(reward, 200, seed, evolution.Algorithm('random', 16, 4))
    best = np.maximum.accumulate([t.reward for t in e])
    assert best[-1] > best[15]  # Improves on its first population.
    evo.append(best[-1])
    rnd.append(max(t.reward for t in r))
    assert len({t.hash for t in e}) == 200  # No network evaluated twice.
  assert all(a > b for a, b in zip(evo, rnd)), (evo, rnd)


# ------------------------------------------------------------ subprocesses

TOY = {'search.objective': 'toy', 'search.heartbeat_s': 1,
       'search.grace_s': 10, 'search.population_size': 4,
       'search.tournament_size': 2}


def _search(workdir, overrides, log_name='search'):
  cmd = [sys.executable, '-m', 'spinenet_jax.search',
         f'--config={REPO / "configs" / "search_shapes.py"}',
         f'--workdir={workdir}', *cli_overrides(overrides)]
  # rbg: a random-number generator that compiles in half the time of
  # threefry (the init of a new network is mostly RNG kernels).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
             CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1',
             JAX_DEFAULT_PRNG_IMPL='rbg')
  log = open(Path(workdir).parent / f'{Path(workdir).name}.{log_name}.log', 'w')
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def _wait(proc, log_path):
  try:
    rc = proc.wait(TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    rc = None
  assert rc == 0, Path(log_path).read_text()[-4000:]


def _records(workdir):
  path = Path(workdir) / 'trials.jsonl'
  text = path.read_text() if path.exists() else ''
  return [json.loads(l) for l in text.split('\n')[:-1]]  # Whole lines.


def test_search_killed_and_restarted_never_retrains_a_finished_trial(
    tmp_path):
  workdir = tmp_path / 'run'
  overrides = {**TOY, 'search.num_trials': 8, 'search.toy_seconds': 1.0}
  proc = _search(workdir, overrides, 'first')
  deadline = time.time() + TIMEOUT_S
  while len(_records(workdir)) < 3 and time.time() < deadline:
    assert proc.poll() is None, (tmp_path / 'run.first.log').read_text()
    time.sleep(0.1)
  time.sleep(0.4)  # Inside the next trial's evaluation.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_after = len(_records(workdir))
  assert 3 <= killed_after < 8
  _wait(_search(workdir, overrides, 'second'), tmp_path / 'run.second.log')
  records = _records(workdir)
  assert len(records) == 8
  assert len({r['hash'] for r in records}) == 8  # Each network once.
  assert len({r['trial'] for r in records}) == 8
  started = collections.Counter(
      l.split()[1] for l in (workdir / 'evaluations.log').read_text().splitlines())
  # Only the trial the kill interrupted was trained again (by the restart).
  assert sorted(started.values()) in ([1] * 8, [1] * 7 + [2])
  assert (workdir / 'best_block_specs.py').exists()
  best = json.loads((workdir / 'best_block_specs.json').read_text())
  assert best['reward'] == max(r['reward'] for r in records)
  sp.to_genotype(best['block_specs'])


def test_two_workers_share_one_storage(tmp_path):
  workdir = tmp_path / 'run'
  overrides = {**TOY, 'search.num_trials': 4, 'search.toy_seconds': 3.0}
  config = search_shapes.get_config()
  study.open_study(str(workdir), config.search)  # So both start at once.
  procs = [_search(workdir, overrides, f'w{i}') for i in range(2)]
  for i, p in enumerate(procs):
    _wait(p, tmp_path / f'run.w{i}.log')
  records = _records(workdir)
  assert len(records) == 4 and len({r['hash'] for r in records}) == 4
  started = (workdir / 'evaluations.log').read_text().splitlines()
  assert len(started) == 4  # Each trial ran exactly once.
  assert len({r['worker'] for r in records}) == 2  # Both did work.


def test_tiny_real_search_end_to_end(tmp_path, data_dir, compile_cache):
  """Two trials of a few proxy steps: the train loop, held-out AP, results."""
  workdir = tmp_path / 'run'
  trial = {'data.data_dir': data_dir, 'data.num_train_examples': 64,
           'data.num_eval_examples': 16, 'data.shapes_image_size': 128,
           'data.image_size': 128, 'data.train_split': 'train[:48]',
           'data.eval_split': 'train[48:]', 'model.filter_size_scale': 0.125,
           'model.endpoints_num_filters': 16, 'model.head_num_convs': 1,
           'model.head_num_filters': 16, 'batch_size': 2, 'total_steps': 2,
           'optimizer.warmup_steps': 1, 'log_every_steps': 1,
           'checkpoint_every_steps': 2}
  overrides = {'search.num_trials': 2, 'search.population_size': 2,
               'search.tournament_size': 1,
               'space.intermediate_levels': (3, 4),
               **{f'trial.{k}': v for k, v in trial.items()}}
  os.environ['JAX_COMPILATION_CACHE_DIR'] = compile_cache
  try:
    _wait(_search(workdir, overrides), tmp_path / 'run.search.log')
  finally:
    del os.environ['JAX_COMPILATION_CACHE_DIR']
  log = (tmp_path / 'run.search.log').read_text()
  assert log.count('trials/h') == 2, log
  records = _records(workdir)
  assert len(records) == 2
  for r in records:
    assert r['macs'] > 0 and r['params'] > 0 and 0 <= r['AP'] <= 1
    assert (workdir / 'trials' / r['hash'] / 'train.log').exists()
  assert 'Evaluation at step 2' in (
      workdir / 'trials' / records[0]['hash'] / 'train.log').read_text()
  assert (workdir / 'top1_vs_spinenet49.png').exists()
  text = (workdir / 'best_block_specs.py').read_text()
  namespace = {}
  exec(compile(text, 'best_block_specs.py', 'exec'), namespace)  # pylint: disable=exec-used
  config = namespace['get_config']()
  assert config.model.block_specs == namespace['BLOCK_SPECS']
  assert config.total_steps == 2
  small = dataclasses.replace(sp.DEFAULT, intermediate_levels=(3, 4))
  sp.to_genotype(namespace['BLOCK_SPECS'], small)


def test_workers_claiming_one_network_back_off(tmp_path, monkeypatch):
  """Two workers propose the same network: the one that looks last (here the
  earlier trial) proposes again; of two retries of one trial only the
  earlier runs."""
  s = study.open_study(str(tmp_path), search_shapes.get_config().search)
  first, second = s.ask(), s.ask()
  same = sp.sample(np.random.default_rng(0))
  real, calls = evolution.propose, []

  def propose(*args, **kwargs):  # Each worker's first proposal is `same`.
    calls.append(1)
    return same if len(calls) <= 2 else real(*args, **kwargs)

  monkeypatch.setattr(evolution, 'propose', propose)
  algorithm = evolution.Algorithm('random', 4, 2)
  g2 = study._claim(second, s, sp.DEFAULT, algorithm, 0)
  g1 = study._claim(first, s, sp.DEFAULT, algorithm, 0)
  assert g2 == same and g1 != same
  assert first.user_attrs['hash'] != second.user_attrs['hash']
  for _ in range(2):
    study.requeue(s, second)
  retries = [t for t in s.get_trials() if t.state.name == 'WAITING']
  s.tell(second, 1.0)
  assert [study._superseded(s, t) for t in retries] == [True, True]
  s.tell(first, 0.5)
  assert not study._over_budget(s, retries[0], 3)
  assert study._over_budget(s, retries[0], 2)
