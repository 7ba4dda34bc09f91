"""SpineNet block specifications (scale permutations) and scaling maps, as data.

A block specification is a sequence of ``(level, block_fn, (input0, input1),
is_output)`` tuples. Inputs index a growing list of feature maps: entries 0 and
1 are the two stem blocks and spec ``i`` produces entry ``i + 2``. This is the
scale permutation of Du et al., CVPR 2020 (arXiv:1912.05027), section 3.1, in
the format of Model Garden's `official/vision/modeling/backbones/spinenet.py`
`SPINENET_BLOCK_SPECS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

BLOCK_FNS = ('bottleneck', 'residual')

# Channels of a block at each level before the bottleneck expansion (x4).
FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}


class BlockSpec(NamedTuple):
  """One scale-permuted block: its level, type, two inputs, output or not."""
  level: int
  block_fn: str
  input_offsets: tuple[int, int]
  is_output: bool


def _spec(level: int, block_fn: str, inputs: Sequence[int],
          is_output: bool) -> BlockSpec:
  return BlockSpec(level, block_fn, tuple(inputs), is_output)


# Model Garden's SPINENET_BLOCK_SPECS. The last entry (a level-2 output) is
# outside the level 3..7 endpoints, so it carries no weights there; `plan`
# prunes it. It is kept so that the stochastic depth rates use Model Garden's
# denominator (16).
SPINENET_BLOCK_SPECS = tuple(_spec(*s) for s in [
    (2, 'bottleneck', (0, 1), False),
    (4, 'residual', (0, 1), False),
    (3, 'bottleneck', (2, 3), False),
    (4, 'bottleneck', (2, 4), False),
    (6, 'residual', (3, 5), False),
    (4, 'bottleneck', (3, 5), False),
    (5, 'residual', (6, 7), False),
    (7, 'residual', (6, 8), False),
    (5, 'bottleneck', (8, 9), False),
    (5, 'bottleneck', (8, 10), False),
    (4, 'bottleneck', (5, 10), True),
    (3, 'bottleneck', (4, 10), True),
    (5, 'bottleneck', (7, 12), True),
    (7, 'bottleneck', (5, 14), True),
    (6, 'bottleneck', (12, 14), True),
    (2, 'bottleneck', (2, 13), True),
])


@dataclasses.dataclass(frozen=True)
class Scaling:
  """Width and depth of one SpineNet model id, with its RetinaNet head."""
  endpoints_num_filters: int
  filter_size_scale: float
  resample_alpha: float
  block_repeats: int
  head_num_convs: int
  head_num_filters: int
  anchor_size: float


# 49S uses 256-channel endpoints, not the 128 of Model Garden's SCALING_MAP:
# 256 is what its published size (11.9M params, 33.8B FLOPs; Du et al., 2020)
# and its released checkpoint have.
SCALING_MAP = {
    '49S': Scaling(256, 0.65, 0.5, 1, 4, 128, 3.0),
    '49': Scaling(256, 1.0, 0.5, 1, 4, 256, 3.0),
    '96': Scaling(256, 1.0, 0.5, 2, 4, 256, 3.0),
    '143': Scaling(256, 1.0, 1.0, 3, 4, 256, 4.0),
    '143L': Scaling(256, 1.3, 1.0, 3, 4, 256, 4.0),
    '190': Scaling(512, 1.3, 1.0, 4, 7, 512, 4.0),
}


def get_scaling(model_id: str) -> Scaling:
  """Returns the scaling of `model_id`, or raises a ValueError naming it."""
  if model_id not in SCALING_MAP:
    hint = (' (a SpineNet-Mobile id: build it with SpineNetMobile, or use it '
            'as the model_id of RetinaNet / Classifier)'
            if is_mobile(model_id) else '')
    raise ValueError(f'Unknown SpineNet model id {model_id!r}{hint}; known '
                     f'ids: {sorted(SCALING_MAP)}; SpineNet-Mobile ids: '
                     f'{mobile_model_ids()}.')
  return SCALING_MAP[model_id]


def to_block_specs(specs: Sequence[Any]) -> tuple[BlockSpec, ...]:
  """Converts config data (tuples, lists or dicts) to BlockSpecs."""
  out = []
  for i, s in enumerate(specs):
    try:
      if isinstance(s, dict) or hasattr(s, 'keys'):
        s = (s['level'], s['block_fn'], s['input_offsets'], s['is_output'])
      level, block_fn, inputs, is_output = s
      inputs = tuple(int(j) for j in inputs)
      if len(inputs) != 2:
        raise ValueError
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(
          f'Block spec {i} ({s!r}) is not (level, block_fn, (input0, input1), '
          'is_output).') from e
    out.append(BlockSpec(int(level), str(block_fn), inputs, bool(is_output)))
  return tuple(out)


def validate(specs: Sequence[BlockSpec], min_level: int = 3,
             max_level: int = 7, block_fns: Sequence[str] = BLOCK_FNS,
             num_stem: int = 2) -> None:
  """Raises a ValueError naming the first bad block of a permutation."""
  if not 1 <= min_level <= max_level <= 7:
    raise ValueError(f'Need 1 <= min_level <= max_level <= 7, got min_level='
                     f'{min_level}, max_level={max_level}.')
  outputs = {}
  for i, s in enumerate(specs):
    name = f'Block {i} {tuple(s)}'
    if not 1 <= s.level <= 7:
      raise ValueError(f'{name}: level {s.level} is outside 1..7.')
    if s.block_fn not in block_fns:
      raise ValueError(f'{name}: unknown block type {s.block_fn!r}; expected '
                       f'one of {tuple(block_fns)}.')
    for j in s.input_offsets:
      if not 0 <= j < i + num_stem:
        raise ValueError(
            f'{name}: input {j} refers to itself or a later block (block {i} '
            f'is feature {i + num_stem}; it may only read features '
            f'0..{i + num_stem - 1}, where 0..{num_stem - 1} are the stem).')
    if s.is_output:
      if s.level in outputs:
        raise ValueError(f'{name}: duplicate output for level {s.level} (block '
                         f'{outputs[s.level]} is already its output).')
      outputs[s.level] = i
  missing = [l for l in range(min_level, max_level + 1) if l not in outputs]
  if missing:
    raise ValueError(f'The block specs have no output block for level(s) '
                     f'{missing}; every level in {min_level}..{max_level} '
                     'needs one.')


@dataclasses.dataclass(frozen=True)
class Node:
  """One scale-permuted block as built: its parents and merged extras."""
  index: int            # Feature index (spec index + number of stem blocks).
  spec_index: int
  level: int
  block_fn: str
  filters: int          # Block filters before bottleneck expansion.
  channels: int         # Output channels.
  inputs: tuple[int, int]
  extras: tuple[int, ...]  # Unused same-shape blocks summed in (outputs only).


def block_channels(block_fn: str, filters: int) -> int:
  """Output channels of a SpineNet block: x4 for bottlenecks."""
  return 4 * filters if block_fn == 'bottleneck' else filters


def plan(specs: Sequence[BlockSpec], filter_size_scale: float, min_level: int,
         max_level: int, stem: Sequence[tuple[int, str, int]],
         filter_size_map: dict[int, int] = FILTER_SIZE_MAP,
         channels_fn: Callable[[str, int], int] = block_channels
         ) -> tuple[list[Node], dict[int, int]]:
  """Lays out the network: which blocks are built and what feeds each one.

  Args:
    specs: validated block specs.
    filter_size_scale: width multiplier.
    min_level, max_level: endpoint levels.
    stem: (level, block_fn, channels) of each stem feature.
    filter_size_map: base filters per level.
    channels_fn: output channels of (block_fn, filters).

  Returns:
    The built nodes in order (blocks unreachable from the endpoints pruned,
    like Keras does for Model Garden's dead level-2 block) and a map from
    endpoint level to feature index.
  """
  levels = [l for l, _, _ in stem]
  channels = [c for _, _, c in stem]
  outdeg = [0] * len(stem)
  nodes, endpoints = [], {}
  for i, s in enumerate(specs):
    filters = int(filter_size_map[s.level] * filter_size_scale)
    ch = channels_fn(s.block_fn, filters)
    for j in s.input_offsets:
      outdeg[j] += 1
    extras = []
    if s.is_output:
      for j in range(len(levels)):
        if outdeg[j] == 0 and levels[j] == s.level and channels[j] == ch:
          extras.append(j)
          outdeg[j] += 1
    index = len(levels)
    nodes.append(Node(index, i, s.level, s.block_fn, filters, ch,
                      tuple(s.input_offsets), tuple(extras)))
    levels.append(s.level)
    channels.append(ch)
    outdeg.append(0)
    if s.is_output and min_level <= s.level <= max_level:
      endpoints[s.level] = index
  # Keep only what the endpoints depend on.
  by_index = {n.index: n for n in nodes}
  needed, todo = set(), list(endpoints.values())
  while todo:
    k = todo.pop()
    if k in needed or k not in by_index:
      continue
    needed.add(k)
    todo.extend(by_index[k].inputs + by_index[k].extras)
  return [n for n in nodes if n.index in needed], endpoints


# ---------------------------------------------------------------------------
# SpineNet-Mobile (Du et al., arXiv:2010.11426; Model Garden's
# `backbones/spinenet_mobile.py`): the same scale-permutation idea with
# MBConv blocks. Model ids are '49_mobile', '49S_mobile' and '49XS_mobile'
# (Model Garden calls them '49', '49S', '49XS' under backbone type
# 'spinenet_mobile').

MOBILE_SUFFIX = '_mobile'
MOBILE_BLOCK_FNS = ('mbconv',)

# Block filters (= output channels: MBConv has no x4 expansion) per level.
# Level 0 is only the stem conv's width.
MOBILE_FILTER_SIZE_MAP = {0: 8, 1: 16, 2: 24, 3: 40, 4: 80, 5: 112, 6: 112,
                          7: 112}

# Model Garden's (= TPU's) mobile SPINENET_BLOCK_SPECS. Feature 0 is the
# level-1 stem block and feature 1 the level-2 stem block. All 16 entries are
# used; the unused level-5 block (feature 12) is summed into the level-5
# output (feature 15).
SPINENET_MOBILE_BLOCK_SPECS = tuple(_spec(*s) for s in [
    (2, 'mbconv', (0, 1), False),
    (2, 'mbconv', (1, 2), False),
    (4, 'mbconv', (1, 2), False),
    (3, 'mbconv', (3, 4), False),
    (4, 'mbconv', (3, 5), False),
    (6, 'mbconv', (4, 6), False),
    (4, 'mbconv', (4, 6), False),
    (5, 'mbconv', (7, 8), False),
    (7, 'mbconv', (7, 9), False),
    (5, 'mbconv', (9, 10), False),
    (5, 'mbconv', (9, 11), False),
    (4, 'mbconv', (6, 11), True),
    (3, 'mbconv', (5, 11), True),
    (5, 'mbconv', (8, 13), True),
    (7, 'mbconv', (6, 15), True),
    (6, 'mbconv', (13, 15), True),
])


@dataclasses.dataclass(frozen=True)
class MobileScaling:
  """Width of one SpineNet-Mobile model id, with its RetinaNet head.

  `activation` and `image_size` are what Model Garden's
  `coco_spinenet{49,49s,49xs}_mobile_tpu.yaml` use; the head is separable.
  """
  endpoints_num_filters: int
  filter_size_scale: float
  block_repeats: int
  head_num_convs: int
  head_num_filters: int
  anchor_size: float
  activation: str
  image_size: int
  head_use_separable_conv: bool = True


MOBILE_SCALING_MAP = {
    '49': MobileScaling(48, 1.0, 1, 4, 48, 3.0, 'hard_swish', 384),
    '49S': MobileScaling(40, 0.65, 1, 4, 40, 3.0, 'hard_swish', 384),
    '49XS': MobileScaling(24, 0.6, 1, 4, 24, 3.0, 'swish', 256),
}


def is_mobile(model_id: str) -> bool:
  """True for SpineNet-Mobile ids ('49_mobile', '49S_mobile', ...)."""
  return str(model_id).endswith(MOBILE_SUFFIX)


def mobile_model_ids() -> list[str]:
  """The SpineNet-Mobile model ids: '49_mobile', '49S_mobile', '49XS_mobile'."""
  return [k + MOBILE_SUFFIX for k in MOBILE_SCALING_MAP]


def get_mobile_scaling(model_id: str) -> MobileScaling:
  """Scaling of '49_mobile' (or Model Garden's plain '49'), '49S_mobile'..."""
  key = model_id[:-len(MOBILE_SUFFIX)] if is_mobile(model_id) else model_id
  if key not in MOBILE_SCALING_MAP:
    raise ValueError(f'Unknown SpineNet-Mobile model id {model_id!r}; known '
                     f'ids: {mobile_model_ids()}.')
  return MOBILE_SCALING_MAP[key]


def get_any_scaling(model_id: str) -> Scaling | MobileScaling:
  """The scaling of any model id: SpineNet or SpineNet-Mobile ('*_mobile')."""
  if is_mobile(model_id):
    return get_mobile_scaling(model_id)
  return get_scaling(model_id)


def mobile_channels(block_fn: str, filters: int) -> int:
  """Output channels of a SpineNet-Mobile block: its filters."""
  del block_fn  # MBConv has no expansion at its output.
  return filters


# ---------------------------------------------------------------------------
# Families: what SpineNet and SpineNet-Mobile fix for the shared
# scale-permuted core (`spinenet.ScalePermutedNetwork`).


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """Default permutation, block types, widths and stem of a network family."""
  block_specs: tuple[BlockSpec, ...]
  block_fns: tuple[str, ...]
  filter_size_map: Mapping[int, int]
  stem: tuple[tuple[int, str], ...]  # (level, block_fn) of each stem feature.
  channels_fn: Callable[[str, int], int]
  get_scaling: Callable[[str], Scaling | MobileScaling]

  def plan(self, block_specs: Sequence[Any] | None, filter_size_scale: float,
           min_level: int, max_level: int
           ) -> tuple[tuple[BlockSpec, ...], list[Node], dict[int, int]]:
    """Validated block specs (the default if None), built nodes, endpoints."""
    block_specs = to_block_specs(
        self.block_specs if block_specs is None else block_specs)
    validate(block_specs, min_level, max_level, block_fns=self.block_fns,
             num_stem=len(self.stem))
    fmap = self.filter_size_map
    stem = [(level, fn, self.channels_fn(fn, int(fmap[level] *
                                                 filter_size_scale)))
            for level, fn in self.stem]
    nodes, endpoints = plan(block_specs, filter_size_scale, min_level,
                            max_level, stem, filter_size_map=fmap,
                            channels_fn=self.channels_fn)
    return block_specs, nodes, endpoints


SPINENET = Family(SPINENET_BLOCK_SPECS, BLOCK_FNS, FILTER_SIZE_MAP,
                  ((2, 'bottleneck'), (2, 'bottleneck')), block_channels,
                  get_scaling)
SPINENET_MOBILE = Family(SPINENET_MOBILE_BLOCK_SPECS, MOBILE_BLOCK_FNS,
                         MOBILE_FILTER_SIZE_MAP, ((1, 'mbconv'), (2, 'mbconv')),
                         mobile_channels, get_mobile_scaling)
