"""The scale-permuted search space as data: genotypes, sampler, membership.

The space is the one of Du et al., CVPR 2020 (arXiv:1912.05027), sections 3.1
and 3.3, for the R0-SP53 / SpineNet-49 search: a ResNet-50 seed with two fixed
level-2 stem blocks, 10 intermediate blocks whose levels are a permutation of
{L2: 1, L3: 3, L4: 5, L5: 1}, each adjusted by a level delta in {-1, 0, +1,
+2}, then 5 output blocks whose levels are a permutation of L3..L7; every
block picks a type (bottleneck or residual) and two distinct parents among
earlier features (intermediate blocks only among the last `window` = 5, stem
counted; outputs among all). Parents are absolute feature indices, as in
Model Garden's `SPINENET_BLOCK_SPECS` (0, 1 are the stem; spec j is feature
j + 2). Other seeds (other level multisets, SpineNet-Mobile's MBConv blocks)
are the same dataclass with other values.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Any, Iterator, Sequence

import numpy as np

from spinenet_jax import specs as specs_lib
from spinenet_jax.specs import BlockSpec

FAMILIES = {'spinenet': specs_lib.SPINENET,
            'spinenet_mobile': specs_lib.SPINENET_MOBILE}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Seed levels, level deltas, block types and the parent window."""
  intermediate_levels: tuple[int, ...] = (2, 3, 3, 3, 4, 4, 4, 4, 4, 5)
  output_levels: tuple[int, ...] = (3, 4, 5, 6, 7)
  level_deltas: tuple[int, ...] = (-1, 0, 1, 2)
  block_fns: tuple[str, ...] = ('bottleneck', 'residual')
  window: int | None = 5  # Intermediates: parents among the last `window`.
  family: str = 'spinenet'  # The network family: stem, widths, block types.
  min_block_level: int = 1
  max_block_level: int = 7

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'Unknown family {self.family!r}; expected one of '
                       f'{sorted(FAMILIES)}.')
    bad = set(self.block_fns) - set(FAMILIES[self.family].block_fns)
    if bad:
      raise ValueError(f'Block types {sorted(bad)} are not in family '
                       f'{self.family!r} ({FAMILIES[self.family].block_fns}).')
    if sorted(self.output_levels) != list(range(
        min(self.output_levels), max(self.output_levels) + 1)):
      raise ValueError(f'output_levels {self.output_levels} must be one per '
                       'level of a contiguous range (e.g. 3..7).')
    if self.window is not None and self.window < 2:
      raise ValueError(f'window={self.window}: a block needs two parents, '
                       'so the window must be at least 2 (or None: any).')

  @property
  def num_stem(self) -> int:
    return len(FAMILIES[self.family].stem)

  @property
  def num_intermediate(self) -> int:
    return len(self.intermediate_levels)

  @property
  def num_blocks(self) -> int:
    return len(self.intermediate_levels) + len(self.output_levels)

  @property
  def min_level(self) -> int:
    return min(self.output_levels)

  @property
  def max_level(self) -> int:
    return max(self.output_levels)

  def in_range(self, levels: Sequence[int]) -> bool:
    """Whether every level is in min_block_level..max_block_level."""
    return all(self.min_block_level <= l <= self.max_block_level
               for l in levels)

  def candidates(self, j: int) -> range:
    """Feature indices block `j` may take as parents."""
    k = j + self.num_stem
    if j >= self.num_intermediate or self.window is None:
      return range(0, k)
    return range(max(0, k - self.window), k)


DEFAULT = SearchSpace()
# SpineNet-Mobile's MBConv blocks on the seed Vertex AI NAS uses for its
# `spinenet_mbconv` space ({L2: 1, L3: 1, L4: 5, L5: 4}, EfficientNet-B0).
MOBILE = SearchSpace(intermediate_levels=(2, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5),
                     block_fns=('mbconv',), family='spinenet_mobile')


def from_config(cfg: Any) -> SearchSpace:
  """A SearchSpace from a config dict (`config.space`)."""
  values = dict(cfg)
  for key in ('intermediate_levels', 'output_levels', 'level_deltas',
              'block_fns'):
    if key in values:
      values[key] = tuple(values[key])
  unknown = set(values) - {f.name for f in dataclasses.fields(SearchSpace)}
  if unknown:
    raise ValueError(f'Unknown search space fields {sorted(unknown)}; known: '
                     f'{[f.name for f in dataclasses.fields(SearchSpace)]}.')
  return SearchSpace(**values)


@dataclasses.dataclass(frozen=True)
class Genotype:
  """One point of the space: the decisions that give a block spec list."""
  base_levels: tuple[int, ...]  # A permutation of intermediate_levels.
  deltas: tuple[int, ...]       # One level delta per intermediate block.
  output_levels: tuple[int, ...]  # A permutation of output_levels.
  block_fns: tuple[str, ...]    # One per block.
  parents: tuple[tuple[int, int], ...]  # Sorted distinct pair per block.

  def levels(self) -> tuple[int, ...]:
    return tuple(b + d for b, d in zip(self.base_levels, self.deltas)
                 ) + self.output_levels

  def block_specs(self) -> tuple[BlockSpec, ...]:
    """The genotype in `specs.py`'s format (outputs last)."""
    n = len(self.base_levels)
    return tuple(BlockSpec(level, fn, tuple(p), j >= n) for j, (level, fn, p)
                 in enumerate(zip(self.levels(), self.block_fns,
                                  self.parents)))

  def genes(self) -> dict[tuple, Any]:
    """Named genes: each mutation changes exactly one of them."""
    g = {('intermediate_permutation',): self.base_levels,
         ('output_permutation',): self.output_levels}
    g.update({('delta', i): d for i, d in enumerate(self.deltas)})
    g.update({('block_fn', j): f for j, f in enumerate(self.block_fns)})
    g.update({('parents', j): p for j, p in enumerate(self.parents)})
    return g


def sample(rng: np.random.Generator, space: SearchSpace = DEFAULT) -> Genotype:
  """A uniformly drawn decision per gene (seeded; NumPy, outside jit)."""
  while True:
    base = tuple(int(v) for v in rng.permutation(space.intermediate_levels))
    deltas = tuple(int(rng.choice(space.level_deltas)) for _ in base)
    if space.in_range([b + d for b, d in zip(base, deltas)]):
      break
  outs = tuple(int(v) for v in rng.permutation(space.output_levels))
  fns = tuple(str(rng.choice(space.block_fns))
              for _ in range(space.num_blocks))
  parents = tuple(
      tuple(sorted(int(v) for v in rng.choice(space.candidates(j), 2,
                                              replace=False)))
      for j in range(space.num_blocks))
  return Genotype(base, deltas, outs, fns, parents)


def _decompose(levels: Sequence[int], space: SearchSpace
               ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """Seed levels and deltas giving `levels` (backtracking), or None."""
  left = collections.Counter(space.intermediate_levels)
  order = sorted(space.level_deltas, key=abs)
  base: list[int] = []

  def place(i: int) -> bool:
    if i == len(levels):
      return True
    for d in order:
      b = levels[i] - d
      if left[b] > 0:
        left[b] -= 1
        base.append(b)
        if place(i + 1):
          return True
        base.pop()
        left[b] += 1
    return False

  if not place(0):
    return None
  return tuple(base), tuple(l - b for l, b in zip(levels, base))


def to_genotype(block_specs: Sequence[Any],
                space: SearchSpace = DEFAULT) -> Genotype:
  """The genotype of a block spec list; a ValueError says why it is outside.

  Checks `specs.validate` (the family's own rules) and the space's: the
  number of blocks, outputs last and one per output level, block types,
  levels reachable from the seed with the level deltas, and the parent
  window.
  """
  bs = specs_lib.to_block_specs(block_specs)
  family = FAMILIES[space.family]
  specs_lib.validate(bs, space.min_level, space.max_level,
                     block_fns=family.block_fns, num_stem=space.num_stem)
  n, n_int = space.num_blocks, space.num_intermediate
  if len(bs) != n:
    raise ValueError(f'The space has {n} blocks ({n_int} intermediate + '
                     f'{len(space.output_levels)} outputs), got {len(bs)}.')
  for j, s in enumerate(bs):
    if s.is_output != (j >= n_int):
      raise ValueError(f'Block {j} {tuple(s)}: blocks {n_int}..{n - 1} are '
                       'the outputs and only they.')
    if s.block_fn not in space.block_fns:
      raise ValueError(f'Block {j} {tuple(s)}: block type not in the space '
                       f'{space.block_fns}.')
    a, b = sorted(s.input_offsets)
    if a == b:
      raise ValueError(f'Block {j} {tuple(s)}: the two parents must differ.')
    cand = space.candidates(j)
    if a < cand.start:
      raise ValueError(f'Block {j} {tuple(s)}: parent {a} is outside the '
                       f'window (features {cand.start}..{cand.stop - 1}).')
  outs = tuple(s.level for s in bs[n_int:])
  if sorted(outs) != sorted(space.output_levels):
    raise ValueError(f'Output levels {outs} are not a permutation of '
                     f'{space.output_levels}.')
  levels = [s.level for s in bs[:n_int]]
  split = _decompose(levels, space)
  if split is None:
    raise ValueError(
        f'Intermediate levels {levels} are not the seed '
        f'{space.intermediate_levels} permuted, each moved by one of '
        f'{space.level_deltas}.')
  if not space.in_range(levels):
    raise ValueError(f'Intermediate levels {levels} leave '
                     f'{space.min_block_level}..{space.max_block_level}.')
  return Genotype(split[0], split[1], outs, tuple(s.block_fn for s in bs),
                  tuple(tuple(sorted(s.input_offsets)) for s in bs))


def _multinomial(values: Sequence[Any]) -> int:
  counts = collections.Counter(values).values()
  return math.factorial(len(values)) // math.prod(
      math.factorial(c) for c in counts)


def size(space: SearchSpace = DEFAULT) -> dict[str, int]:
  """Number of genotypes, in closed form, by factor (the paper's section 3.1).

  Level permutations count distinct level sequences (equal-level swaps are
  one permutation), so the intermediate factor is the multinomial
  10! / (3! 5!) rather than the paper's 10!. Distinct *networks* are fewer:
  different seed-plus-delta choices can give the same levels, and
  `graph.canonical_hash` merges isomorphic ones.
  """
  if not space.in_range([l + d for l in space.intermediate_levels
                         for d in space.level_deltas]):
    raise ValueError('size() assumes every seed level with every delta stays '
                     'inside min_block_level..max_block_level.')
  out = {
      'intermediate_permutations': _multinomial(space.intermediate_levels),
      'output_permutations': _multinomial(space.output_levels),
      'level_adjustments': len(space.level_deltas) ** space.num_intermediate,
      'block_types': len(space.block_fns) ** space.num_blocks,
      'connections': math.prod(math.comb(len(space.candidates(j)), 2)
                               for j in range(space.num_blocks)),
  }
  out['total'] = math.prod(out.values())
  return out


def enumerate_genotypes(space: SearchSpace) -> Iterator[Genotype]:
  """Every genotype by brute force (raw permutations, duplicates included).

  Only for tiny spaces: it checks `size` and the sampler.
  """
  n = space.num_blocks
  pairs = [list(itertools.combinations(space.candidates(j), 2))
           for j in range(n)]
  for base, deltas, outs, fns, parents in itertools.product(
      itertools.permutations(space.intermediate_levels),
      itertools.product(space.level_deltas, repeat=space.num_intermediate),
      itertools.permutations(space.output_levels),
      itertools.product(space.block_fns, repeat=n),
      itertools.product(*pairs)):
    yield Genotype(base, deltas, outs, fns, parents)
