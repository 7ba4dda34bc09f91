"""Regularized (aging) evolution and random search over the space.

Regularized evolution is Algorithm 1 of Real et al., "Regularized Evolution
for Image Classifier Architecture Search" (AAAI 2019): a population of the
`population_size` most recent trials; each new trial mutates the best of
`tournament_size` members drawn with replacement, and the oldest member
leaves as it enters. Random search draws every trial from the same sampler
and is the baseline a search result is compared with.

Both are pure functions of the trial history and a seeded NumPy generator,
so a search that restarts replays its history and proposes what it would
have proposed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from spinenet_jax.search import graph
from spinenet_jax.search.space import DEFAULT, Genotype, SearchSpace, sample

# Mutation operators and their probabilities (a starting point, as AmoebaNet's
# hidden-state and op mutations; not from the SpineNet paper).
MUTATIONS = {'swap_intermediate': 0.2, 'swap_output': 0.1, 'rewire': 0.35,
             'delta': 0.2, 'block_fn': 0.15}
MAX_TRIES = 20


@dataclasses.dataclass(frozen=True)
class Trial:
  """A finished trial as the algorithms see it."""
  genotype: Genotype
  reward: float
  hash: str


def _swap(values: tuple, rng: np.random.Generator) -> tuple | None:
  pairs = [(i, j) for i in range(len(values)) for j in range(i + 1, len(values))
           if values[i] != values[j]]
  if not pairs:
    return None
  i, j = pairs[rng.integers(len(pairs))]
  out = list(values)
  out[i], out[j] = out[j], out[i]
  return tuple(out)


def _redraw(values: tuple, options: Sequence, rng: np.random.Generator
            ) -> tuple | None:
  """`values` with one entry replaced by another of `options`, or None."""
  i = int(rng.integers(len(values)))
  choices = [o for o in options if o != values[i]]
  if not choices:
    return None
  new = type(values[i])(rng.choice(choices))
  return values[:i] + (new,) + values[i + 1:]


def mutate_once(g: Genotype, op: str, rng: np.random.Generator,
                space: SearchSpace = DEFAULT) -> Genotype | None:
  """`g` with one gene changed by `op`, or None where `op` cannot apply."""
  if op == 'swap_intermediate':
    base = _swap(g.base_levels, rng)
    return base and dataclasses.replace(g, base_levels=base)
  if op == 'swap_output':
    outs = _swap(g.output_levels, rng)
    return outs and dataclasses.replace(g, output_levels=outs)
  if op == 'rewire':
    free = [j for j in range(len(g.parents)) if len(space.candidates(j)) > 2]
    if not free:
      return None
    j = free[int(rng.integers(len(free)))]
    keep = g.parents[j][int(rng.integers(2))]
    choices = [c for c in space.candidates(j) if c not in g.parents[j]]
    new = tuple(sorted((keep, int(rng.choice(choices)))))
    return dataclasses.replace(
        g, parents=g.parents[:j] + (new,) + g.parents[j + 1:])
  if op == 'delta':
    deltas = _redraw(g.deltas, space.level_deltas, rng)
    return deltas and dataclasses.replace(g, deltas=deltas)
  if op == 'block_fn':
    fns = _redraw(g.block_fns, space.block_fns, rng)
    return fns and dataclasses.replace(g, block_fns=fns)
  raise ValueError(f'Unknown mutation {op!r}; known: {sorted(MUTATIONS)}.')


def acceptable(g: Genotype, space: SearchSpace, reject_dead: bool) -> bool:
  """Inside the space's level range and, when asked, without dead blocks."""
  if not space.in_range(g.levels()):
    return False
  return not (reject_dead and graph.dead_blocks(g.block_specs(), space))


def mutate(g: Genotype, rng: np.random.Generator,
           space: SearchSpace = DEFAULT, *, seen: frozenset[str] = frozenset(),
           reject_dead: bool = False) -> Genotype | None:
  """A valid child of `g` with a network not in `seen` (canonical hashes).

  Each try draws one operator and changes one gene; a child outside the
  space (a level out of range), with dead blocks (when rejected) or already
  seen is dropped and the parent mutated again, up to MAX_TRIES times.
  """
  ops, p = zip(*MUTATIONS.items())
  p = np.asarray(p) / sum(p)
  for _ in range(MAX_TRIES):
    child = mutate_once(g, str(rng.choice(ops, p=p)), rng, space)
    if child is None or not acceptable(child, space, reject_dead):
      continue
    if graph.canonical_hash(child.block_specs(), space) not in seen:
      return child
  return None


def sample_new(rng: np.random.Generator, space: SearchSpace = DEFAULT, *,
               seen: frozenset[str] = frozenset(),
               reject_dead: bool = False) -> Genotype:
  """A sampled genotype whose network is not in `seen`."""
  for _ in range(100 * MAX_TRIES):
    g = sample(rng, space)
    if acceptable(g, space, reject_dead) and graph.canonical_hash(
        g.block_specs(), space) not in seen:
      return g
  raise RuntimeError('The sampler found no unseen network in '
                     f'{100 * MAX_TRIES} draws: the space is exhausted.')


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Which search and its settings (`config.search`)."""
  name: str = 'evolution'  # or 'random'
  population_size: int = 16
  tournament_size: int = 4
  reject_dead: bool = False

  def __post_init__(self):
    if self.name not in ('evolution', 'random'):
      raise ValueError(f"algorithm {self.name!r}: expected 'evolution' or "
                       "'random'.")
    if not 1 <= self.tournament_size <= self.population_size:
      raise ValueError(
          f'Need 1 <= tournament_size ({self.tournament_size}) <= '
          f'population_size ({self.population_size}).')


def propose(history: Sequence[Trial], rng: np.random.Generator,
            algorithm: Algorithm, space: SearchSpace = DEFAULT,
            seen: frozenset[str] | None = None) -> Genotype:
  """The next genotype to evaluate, given the finished trials in order.

  `seen` holds the hashes not to propose again (default: the history's);
  pass also those of running trials when several workers search together.
  """
  seen = frozenset(t.hash for t in history) if seen is None else seen
  if algorithm.name == 'random' or len(history) < algorithm.population_size:
    return sample_new(rng, space, seen=seen,
                      reject_dead=algorithm.reject_dead)
  population = history[-algorithm.population_size:]  # Aging: the newest.
  picks = rng.integers(len(population), size=algorithm.tournament_size)
  parent = max((population[i] for i in picks), key=lambda t: t.reward)
  child = mutate(parent.genotype, rng, space, seen=seen,
                 reject_dead=algorithm.reject_dead)
  if child is None:  # Every neighbour tried was seen: start afresh.
    return sample_new(rng, space, seen=seen,
                      reject_dead=algorithm.reject_dead)
  return child


def run(reward_fn: Callable[[Genotype], float], num_trials: int, seed: int,
        algorithm: Algorithm, space: SearchSpace = DEFAULT) -> list[Trial]:
  """A whole search in this process (toy rewards; tests and benchmarks)."""
  history: list[Trial] = []
  for n in range(num_trials):
    g = propose(history, np.random.default_rng([seed, n]), algorithm, space)
    history.append(Trial(g, float(reward_fn(g)),
                         graph.canonical_hash(g.block_specs(), space)))
  return history


def toy_reward(target: Sequence) -> Callable[[Genotype], float]:
  """Minus the gene distance of a genotype's specs to `target` specs."""
  return lambda g: -float(graph.distance(g.block_specs(), target))
