"""The network a block spec list builds: dead blocks, pruning, canonical hash.

Liveness is computed by the builder itself (`specs.Family.plan`): when an
output block is built, every earlier block with no consumer yet and the same
level *and* channel count is summed into it (Model Garden's rule, after
NAS-FPN); blocks that no output then depends on are dead and not built.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from spinenet_jax import specs as specs_lib
from spinenet_jax.search.space import DEFAULT, FAMILIES, SearchSpace
from spinenet_jax.specs import BlockSpec, Node


def built_nodes(block_specs: Sequence[Any], space: SearchSpace = DEFAULT,
                filter_size_scale: float = 1.0
                ) -> tuple[tuple[BlockSpec, ...], list[Node], dict[int, int]]:
  """(specs, built nodes, endpoint level -> feature), as the network has."""
  return FAMILIES[space.family].plan(block_specs, filter_size_scale,
                                     space.min_level, space.max_level)


def dead_blocks(block_specs: Sequence[Any], space: SearchSpace = DEFAULT,
                filter_size_scale: float = 1.0) -> tuple[int, ...]:
  """Spec indices of the blocks the network does not build."""
  bs, nodes, _ = built_nodes(block_specs, space, filter_size_scale)
  live = {n.spec_index for n in nodes}
  return tuple(j for j in range(len(bs)) if j not in live)


def _structure(nodes: Sequence[Node], index: dict[int, int]) -> list[tuple]:
  return [(n.level, n.block_fn, tuple(index[j] for j in n.inputs),
           tuple(sorted(index[j] for j in n.extras))) for n in nodes]


def prune(block_specs: Sequence[Any], space: SearchSpace = DEFAULT,
          filter_size_scale: float = 1.0) -> tuple[BlockSpec, ...]:
  """The specs without their dead blocks, parents re-indexed.

  Raises a ValueError when removing them would change what the others merge
  (a block whose only earlier consumer was dead would then be summed into an
  output): such specs must be built as they are.
  """
  bs, nodes, _ = built_nodes(block_specs, space, filter_size_scale)
  num_stem = space.num_stem
  index = {i: i for i in range(num_stem)}
  index.update({n.index: num_stem + k for k, n in enumerate(nodes)})
  pruned = tuple(BlockSpec(bs[n.spec_index].level, n.block_fn,
                           tuple(index[j] for j in n.inputs),
                           bs[n.spec_index].is_output) for n in nodes)
  _, again, _ = built_nodes(pruned, space, filter_size_scale)
  same = {i: i for i in range(num_stem + len(pruned))}
  if len(again) != len(nodes) or _structure(again, same) != (
      _structure(nodes, index)):
    raise ValueError('Pruning the dead blocks would change which unused '
                     'blocks are merged into outputs; build these specs as '
                     'they are.')
  return pruned


def _digest(value: Any) -> str:
  return hashlib.sha256(repr(value).encode()).hexdigest()


def canonical_hash(block_specs: Sequence[Any], space: SearchSpace = DEFAULT,
                   filter_size_scale: float = 1.0) -> str:
  """A hash equal for specs that build the same network (16 hex digits).

  The built graph (dead blocks pruned, merged blocks as edges) is relabelled
  in a canonical topological order: among the blocks ready to be placed, the
  one with the smallest structural signature goes first. A signature holds a
  block's level, type and output level, its parents' signatures and its
  consumers' (so that two blocks alike upstream but read by different blocks
  are told apart). So equal-level swaps, outputs listed in another order and
  the order of a block's two parents all hash alike. (With stochastic depth
  on, the spec order also sets each block's drop rate; the hash ignores it.)
  """
  _, nodes, endpoints = built_nodes(block_specs, space, filter_size_scale)
  num_stem = space.num_stem
  out_level = {f: level for level, f in endpoints.items()}
  edges = [(j, n.index, kind) for n in nodes
           for kind, js in (('in', n.inputs), ('merge', n.extras)) for j in js]
  up: dict[int, str] = {i: f'stem{i}' for i in range(num_stem)}
  for n in nodes:  # Nodes are in topological order.
    up[n.index] = _digest((n.level, n.block_fn, out_level.get(n.index),
                           sorted(up[j] for j in n.inputs),
                           sorted(up[j] for j in n.extras)))
  down: dict[int, str] = {}
  for k in sorted(up, reverse=True):
    down[k] = _digest(sorted((kind, up[c], down[c])
                             for j, c, kind in edges if j == k))
  sig = {k: (up[k], down[k]) for k in up}
  deps = {n.index: set(n.inputs) | set(n.extras) for n in nodes}
  placed = {i: i for i in range(num_stem)}
  todo = {n.index for n in nodes}
  while todo:
    k = min((k for k in todo if deps[k] <= placed.keys()),
            key=lambda k: (sig[k], k))
    placed[k] = len(placed)
    todo.remove(k)
  by_index = {n.index: n for n in nodes}
  encoded = [(by_index[k].level, by_index[k].block_fn, out_level.get(k),
              sorted(placed[j] for j in by_index[k].inputs),
              sorted(placed[j] for j in by_index[k].extras))
             for k in sorted(by_index, key=placed.get)]
  return _digest((space.family, encoded))[:16]


def distance(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Genes that differ between two spec lists of one length, position-wise:
  level, block type, and each parent (a parent pair counts 0, 1 or 2)."""
  a, b = specs_lib.to_block_specs(a), specs_lib.to_block_specs(b)
  if len(a) != len(b):
    raise ValueError(f'Spec lists differ in length: {len(a)} vs {len(b)}.')
  d = 0
  for x, y in zip(a, b):
    d += (x.level != y.level) + (x.block_fn != y.block_fn)
    d += 2 - len(set(x.input_offsets) & set(y.input_offsets))
  return d
