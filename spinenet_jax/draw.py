"""Draws a scale-permuted SpineNet as a picture, like the paper's figures.

```sh
python -m spinenet_jax.draw --model=49 --output=spinenet49.png     # or .svg
python -m spinenet_jax.draw --config=configs/x.py --output=x.png   # config.model.block_specs
python -m spinenet_jax.draw --diff=49 --diff=best_block_specs.json --output=diff.png
```

Blocks are placed by their order (x) and level (y, level 7 at the top),
coloured by block type; arrows are the cross-scale connections (solid: the two
inputs of a block; dashed: an unused block merged into an output of its
level); outputs are outlined and labelled P3..P7. Blocks that no output
depends on (so not built) are drawn hatched grey.

`--diff=A --diff=B` (the flag given twice; absl has no `--diff A B`) draws A
above B and marks in magenta what differs, position by position: blocks whose
level, type, output-ness or inputs differ, or that only one side has, and the
edges (source -> target, solid or merged) that only one side has. A and B are
each a model id (49, 49S, 49_mobile, ...), a config `.py` with `get_config()`
(as --config), a `.py` defining `BLOCK_SPECS` (model id 49), or a `.json`
file `{"block_specs": [[level, block_fn, [in0, in1], is_output], ...],
"model_id": "49"}` (model_id optional), as the architecture search writes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any, Sequence

from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spinenet_jax import cli
from spinenet_jax import models
from spinenet_jax.draw_render import (  # pylint: disable=unused-import
    COLOURS, DIFF_COLOUR, EDGE_COLOUR, MERGE_COLOUR, OUTPUT_COLOUR, Edge,
    render_diff_png, render_diff_svg, render_png, render_svg)
from spinenet_jax.spinenet import ScalePermutedNetwork

ACCEPTED = ('a model id (49S, 49, 96, 143, 143L, 190, 49_mobile, 49S_mobile, '
            '49XS_mobile), a config .py with get_config(), a .py defining '
            'BLOCK_SPECS, or a .json file {"block_specs": [[level, block_fn, '
            '[input0, input1], is_output], ...], "model_id": "49"}')


class SourceError(ValueError):
  """A --diff source (model id or file) that cannot be read as a graph."""


@dataclasses.dataclass
class Block:
  """One feature of the graph: a stem or scale-permuted block."""
  index: int      # Feature index (0.. stem, then spec i -> i + num_stem).
  level: int
  kind: str       # 'stem', 'bottleneck', 'residual', 'mbconv'
  inputs: tuple[int, ...]
  extras: tuple[int, ...]
  is_output: bool
  built: bool
  channels: int | None = None


@dataclasses.dataclass
class Graph:
  """A titled scale-permuted graph with its endpoint levels."""
  title: str
  blocks: list[Block]
  min_level: int
  max_level: int

  def edges(self) -> list[Edge]:
    """(source, target, merged) per arrow: inputs solid, merges dashed."""
    return [(j, b.index, merged) for b in self.blocks
            for j, merged in [(j, False) for j in b.inputs]
            + [(j, True) for j in b.extras]]


def graph(model_id: str = '49', block_specs: Sequence[Any] | None = None,
          min_level: int = 3, max_level: int = 7,
          title: str | None = None) -> Graph:
  """The scale-permuted graph of a model id (and optional custom specs)."""
  model = models.RetinaNet(
      model_id=model_id, min_level=min_level, max_level=max_level,
      block_specs=None if block_specs is None else tuple(block_specs))
  return backbone_graph(model.backbone(), title)


def backbone_graph(backbone: ScalePermutedNetwork,
                   title: str | None = None) -> Graph:
  """The graph of an (unbound) SpineNet or SpineNet-Mobile backbone."""
  specs, nodes, _ = backbone.plan()  # Validates; what the model builds.
  stem_levels = [level for level, _ in backbone.family.stem]
  num_stem = len(stem_levels)
  lo, hi = backbone.min_level, backbone.max_level
  built = {n.index: n for n in nodes}
  blocks = [Block(i, level, 'stem', (), (), False, True)
            for i, level in enumerate(stem_levels)]
  for i, s in enumerate(specs):
    index = i + num_stem
    node = built.get(index)
    blocks.append(Block(
        index, s.level, s.block_fn, tuple(s.input_offsets),
        node.extras if node else (), s.is_output and lo <= s.level <= hi,
        node is not None, node.channels if node else None))
  # Stem blocks feed the built network whenever any built block reads them.
  used = {j for b in blocks if b.built for j in b.inputs + b.extras}
  for b in blocks[:num_stem]:
    b.built = b.index in used
  if title is None:
    title = (f'SpineNet-{backbone.model_id}' if backbone.block_specs is None
             else f'custom permutation ({len(specs)} blocks, '
             f'{backbone.model_id} widths)')
  return Graph(title, blocks, lo, hi)


def draw(g: Graph, path: str) -> None:
  """Writes `g` as SVG (a `.svg` path) or a raster image (PNG, ...)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.lower().endswith('.svg'):
    render_svg(g, path)
  else:
    render_png(g, path)


def _load_module(path: str) -> ModuleType:
  """Runs a Python file as a module (the repository root on sys.path)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('_draw_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str) -> Any:
  """`get_config()` of a config file (the repository root on sys.path)."""
  return _load_module(path).get_config()


def graph_from_config(config: Any) -> Graph:
  """The graph of the backbone that `config` (`config.model`) builds."""
  return backbone_graph(models.build_model(config).backbone())


# -------------------------------------------------------------------- diff

def load_graph(source: str, title: str | None = None) -> Graph:
  """The graph of a model id, config `.py`, `BLOCK_SPECS` `.py` or `.json`.

  `title` defaults to the graph's own, prefixed by the file name for files.
  Raises a SourceError (a ValueError) naming `source` and what is accepted.
  """
  source = str(source)
  ext = os.path.splitext(source)[1].lower()
  if ext in ('.py', '.json') or os.sep in source or os.path.isfile(source):
    if not os.path.isfile(source):
      raise SourceError(f'{source}: no such file; expected {ACCEPTED}.')
    if ext not in ('.py', '.json'):
      raise SourceError(f'{source}: not a .py or .json file; expected '
                        f'{ACCEPTED}.')
    try:
      g = _file_graph(source, ext)
    except SourceError:
      raise
    except Exception as e:  # The file's own code or specs: name the file.
      raise SourceError(f'{source}: {type(e).__name__}: {e}') from e
    g.title = f'{os.path.basename(source)}: {g.title}'
  else:
    try:
      g = graph(source)
    except ValueError as e:
      raise SourceError(f'{source!r} is neither a file nor a known model id '
                        f'({e}); expected {ACCEPTED}.') from e
  if title is not None:
    g.title = title
  return g


def _file_graph(source: str, ext: str) -> Graph:
  if ext == '.json':
    try:
      with open(source) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise SourceError(f'{source}: not readable JSON ({e}); expected '
                        f'{ACCEPTED}.') from e
    if not isinstance(data, dict) or not isinstance(
        data.get('block_specs'), list):
      raise SourceError(f'{source}: JSON without a "block_specs" list; '
                        f'expected {ACCEPTED}.')
    return graph(str(data.get('model_id', '49')), data['block_specs'])
  module = _load_module(source)
  if hasattr(module, 'get_config'):
    return graph_from_config(module.get_config())
  if hasattr(module, 'BLOCK_SPECS'):
    return graph('49', module.BLOCK_SPECS)
  raise SourceError(f'{source}: defines neither get_config() nor '
                    f'BLOCK_SPECS; expected {ACCEPTED}.')


@dataclasses.dataclass(frozen=True)
class DiffResult:
  """What differs between graphs A and B, feature index by feature index."""
  blocks: tuple[int, ...]    # Blocks that differ or that one side lacks.
  edges_a: tuple[Edge, ...]  # Edges only A has.
  edges_b: tuple[Edge, ...]  # Edges only B has.
  details: tuple[str, ...]   # One line per differing block, then edge.

  @property
  def edges(self) -> tuple[Edge, ...]:
    """The edges that only one side has, by target."""
    return tuple(sorted(self.edges_a + self.edges_b, key=_edge_key))

  @property
  def same(self) -> bool:
    return not (self.blocks or self.edges_a or self.edges_b)

  @property
  def summary(self) -> str:
    """E.g. '5 blocks, 7 edges differ' or 'nothing differs'."""
    if self.same:
      return 'nothing differs'
    nb, ne = len(self.blocks), len(self.edges)
    return (f'{nb} block{"" if nb == 1 else "s"}, '
            f'{ne} edge{"" if ne == 1 else "s"} differ')


def _edge_key(e: Edge) -> tuple[int, int, bool]:
  return e[1], e[0], e[2]


def _block_changes(x: Block, y: Block) -> list[str]:
  """How block x (of A) differs from y (of B); inputs in any order."""
  out = []
  if x.level != y.level:
    out.append(f'level {x.level} vs {y.level}')
  if x.kind != y.kind:
    out.append(f'{x.kind} vs {y.kind}')
  if x.is_output != y.is_output:
    out.append(('output' if x.is_output else 'not output') + ' vs ' +
               ('output' if y.is_output else 'not output'))
  if sorted(x.inputs) != sorted(y.inputs):
    out.append(f'inputs {x.inputs} vs {y.inputs}')
  return out


def diff(a: Graph, b: Graph) -> DiffResult:
  """Blocks (level, type, output-ness, inputs) and edges differing A vs B."""
  in_a, in_b = ({x.index: x for x in g.blocks} for g in (a, b))
  blocks, details = [], []
  for i in sorted(in_a.keys() | in_b.keys()):
    x, y = in_a.get(i), in_b.get(i)
    if x is None or y is None:
      side, z = ('A', x) if y is None else ('B', y)
      why = [f'only in {side} ({z.kind}, level {z.level})']
    else:
      why = _block_changes(x, y)
    if why:
      blocks.append(i)
      details.append(f'block {i}: ' + ', '.join(why))
  ea, eb = set(a.edges()), set(b.edges())
  only_a = tuple(sorted(ea - eb, key=_edge_key))
  only_b = tuple(sorted(eb - ea, key=_edge_key))
  for side, edges in (('A', only_a), ('B', only_b)):
    details += [f'edge {s} -> {t}{" (merge)" if m else ""}: only in {side}'
                for s, t, m in edges]
  return DiffResult(tuple(blocks), only_a, only_b, tuple(details))


def draw_diff(a: Graph, b: Graph, path: str, side_by_side: bool = False
              ) -> DiffResult:
  """Writes A above (or left of) B, what differs marked; returns the diff."""
  result = diff(a, b)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  args = (dataclasses.replace(a, title=f'A: {a.title}'),
          dataclasses.replace(b, title=f'B: {b.title}'), path,
          f'A vs B: {result.summary}', (result.blocks, result.edges_a),
          (result.blocks, result.edges_b), side_by_side)
  if path.lower().endswith('.svg'):
    render_diff_svg(*args)
  else:
    render_diff_png(*args)
  return result


# --------------------------------------------------------------------- CLI

def define_flags(fv: flags.FlagValues) -> None:
  """Defines the command-line flags on `fv`."""
  flags.DEFINE_string(
      'model', '49', 'Model id (49S, 49, 96, 143, 190, 49_mobile, ...).',
      flag_values=fv)
  flags.DEFINE_string(
      'config', None, 'A config file; draws the backbone of config.model '
      '(e.g. its block_specs) instead of --model.', flag_values=fv)
  flags.DEFINE_multi_string(
      'diff', None, 'Give twice (--diff=A --diff=B) to draw A above B with '
      'what differs marked. Each: a model id, a config .py, a .py with '
      'BLOCK_SPECS, or a .json with "block_specs" (and "model_id").',
      flag_values=fv)
  flags.DEFINE_string('output', None, 'Output file: .png or .svg.',
                      flag_values=fv)
  flags.mark_flag_as_required('output', flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Draws --model, --config or --diff to --output; `argv` excludes argv[0]."""
  fv = cli.parse_flags('draw', __doc__, define_flags, argv)
  if isinstance(fv, int):
    return fv
  if fv.diff:
    return _main_diff(fv)
  g = graph_from_config(load_config(fv.config)) if fv.config else graph(
      fv.model)
  draw(g, fv.output)
  print(f'Wrote {fv.output}')
  return 0


def _main_diff(fv: flags.FlagValues) -> int:
  """--diff: 2 (with the message) for a user error, else 0."""
  if len(fv.diff) != 2:
    print(f'draw: --diff takes two sources (--diff=A --diff=B), got '
          f'{len(fv.diff)}: {fv.diff}.', file=sys.stderr)
    return 2
  if fv.config or fv['model'].present:
    print('draw: --diff draws its own two sources; leave out --model and '
          '--config.', file=sys.stderr)
    return 2
  try:
    a, b = (load_graph(source) for source in fv.diff)
  except SourceError as e:
    print(f'draw: {e}', file=sys.stderr)
    return 2
  result = draw_diff(a, b, fv.output)
  print(f'Wrote {fv.output}: {result.summary}')
  for line in result.details[:20]:
    print(f'  {line}')
  if len(result.details) > 20:
    print(f'  ... and {len(result.details) - 20} more')
  return 0


# -------------------------------------------------------------- detections

DETECTION_COLOURS = ('#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4',
                     '#42d4f4', '#f032e6', '#bfef45', '#469990', '#9a6324')


def draw_detections(image: np.ndarray, detections: Sequence[dict[str, Any]],
                    caption: str | None = None) -> Image.Image:
  """uint8 RGB image + [{'box': yxyx, 'label', 'score', 'class'}] -> PIL image.

  Boxes get a colour per class and a '<label> <score>' tag; `caption` is
  written at the top left (e.g. classification results).
  """
  img = Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  scale = max(1, round(max(img.size) / 400))
  d = ImageDraw.Draw(img)
  try:
    font = ImageFont.load_default(size=11 * scale)
  except TypeError:
    font = ImageFont.load_default()
  for det in detections:
    y0, x0, y1, x1 = det['box']
    colour = DETECTION_COLOURS[int(det.get('class', 0)) %
                               len(DETECTION_COLOURS)]
    d.rectangle((x0, y0, x1, y1), outline=colour, width=2 * scale)
    tag = f'{det.get("label", det.get("class"))} {det.get("score", 0):.2f}'
    l, t, r, b = d.textbbox((0, 0), tag, font=font)
    ty = y0 - (b - t) - 4 if y0 - (b - t) - 4 >= 0 else y0
    d.rectangle((x0, ty, x0 + (r - l) + 4, ty + (b - t) + 4), fill=colour)
    d.text((x0 + 2 - l, ty + 2 - t), tag, fill='white', font=font)
  if caption:
    l, t, r, b = d.textbbox((0, 0), caption, font=font)
    d.rectangle((0, 0, (r - l) + 6, (b - t) + 6), fill='black')
    d.text((3 - l, 3 - t), caption, fill='white', font=font)
  return img


if __name__ == '__main__':
  sys.exit(main())
