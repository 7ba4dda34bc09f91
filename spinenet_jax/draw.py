"""Draws a scale-permuted SpineNet as a picture, like the paper's figures.

```sh
python -m spinenet_jax.draw --model=49 --output=spinenet49.png     # or .svg
python -m spinenet_jax.draw --config=configs/x.py --output=x.png   # config.model.block_specs
```

Blocks are placed by their order (x) and level (y, level 7 at the top),
coloured by block type; arrows are the cross-scale connections (solid: the two
inputs of a block; dashed: an unused block merged into an output of its
level); outputs are outlined and labelled P3..P7. Blocks that no output
depends on (so not built) are drawn hatched grey.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spinenet_jax import cli
from spinenet_jax import models
from spinenet_jax.spinenet import ScalePermutedNetwork

COLOURS = {'stem': '#9e9e9e', 'bottleneck': '#4e79a7', 'residual': '#f28e2b',
           'mbconv': '#59a14f', 'unused': '#dddddd'}
EDGE_COLOUR = '#555555'
MERGE_COLOUR = '#b07aa1'
OUTPUT_COLOUR = '#d62728'


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


# ------------------------------------------------------------------ layout

CELL_W, CELL_H, BOX_W, BOX_H, MARGIN = 70, 62, 46, 30, 60


def _layout(g: Graph) -> tuple[int, int, int, int,
                              Callable[[Block], tuple[float, float]]]:
  levels = [b.level for b in g.blocks]
  lo, hi = min(levels), max(max(levels), g.max_level)
  width = MARGIN * 2 + 40 + CELL_W * len(g.blocks) + 50
  height = MARGIN + 40 + CELL_H * (hi - lo + 1) + 60
  def centre(b):
    return (MARGIN + 40 + CELL_W * b.index + CELL_W / 2,
            MARGIN + 30 + CELL_H * (hi - b.level) + CELL_H / 2)
  return width, height, lo, hi, centre


def _edge_points(p: tuple[float, float], q: tuple[float, float]
                 ) -> tuple[tuple[float, float], tuple[float, float]]:
  """From the right/side of box p to the left side of box q."""
  (x0, y0), (x1, y1) = p, q
  return (x0 + BOX_W / 2, y0), (x1 - BOX_W / 2, y1)


def _arrow_head(x0: float, y0: float, x1: float, y1: float,
                size: float = 7) -> list[tuple[float, float]]:
  ang = math.atan2(y1 - y0, x1 - x0)
  return [(x1, y1),
          (x1 - size * math.cos(ang - 0.4), y1 - size * math.sin(ang - 0.4)),
          (x1 - size * math.cos(ang + 0.4), y1 - size * math.sin(ang + 0.4))]


def _legend(g: Graph) -> list[tuple[str, str]]:
  kinds = ['stem'] + sorted({b.kind for b in g.blocks if b.kind != 'stem'})
  items = [(COLOURS.get(k, '#888888'), k) for k in kinds]
  if any(not b.built for b in g.blocks):
    items.append((COLOURS['unused'], 'not built'))
  return items


def render_png(g: Graph, path: str, scale: int = 2) -> None:
  """Writes `g` as a raster image (format from the extension of `path`)."""
  width, height, lo, hi, centre = _layout(g)
  img = Image.new('RGB', (width * scale, height * scale), 'white')
  d = ImageDraw.Draw(img)
  try:
    font = ImageFont.load_default(size=11 * scale)
    big = ImageFont.load_default(size=15 * scale)
  except TypeError:  # Old Pillow: fixed-size bitmap font.
    font = big = ImageFont.load_default()
  s = lambda *xy: [v * scale for v in xy]
  d.text(s(MARGIN, 14), g.title, fill='black', font=big)
  for level in range(lo, hi + 1):
    y = MARGIN + 30 + CELL_H * (hi - level) + CELL_H / 2
    d.text(s(12, y - 7), f'L{level}', fill='black', font=font)
    d.line(s(MARGIN + 30, y, width - 40, y), fill='#eeeeee', width=scale)
  by_index = {b.index: b for b in g.blocks}
  for b in g.blocks:
    for j, dashed in [(j, False) for j in b.inputs] + [(j, True)
                                                        for j in b.extras]:
      (x0, y0), (x1, y1) = _edge_points(centre(by_index[j]), centre(b))
      colour = MERGE_COLOUR if dashed else (
          EDGE_COLOUR if b.built else '#cccccc')
      if dashed:
        n = max(int(math.hypot(x1 - x0, y1 - y0) // 8), 1)
        for k in range(0, n, 2):
          t0, t1 = k / n, min((k + 1) / n, 1)
          d.line(s(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0,
                   x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1),
                 fill=colour, width=2 * scale)
      else:
        d.line(s(x0, y0, x1, y1), fill=colour, width=scale + scale // 2)
      d.polygon([tuple(v * scale for v in p)
                 for p in _arrow_head(x0, y0, x1, y1)], fill=colour)
  for b in g.blocks:
    x, y = centre(b)
    fill = COLOURS.get(b.kind, '#888888') if b.built else COLOURS['unused']
    box = s(x - BOX_W / 2, y - BOX_H / 2, x + BOX_W / 2, y + BOX_H / 2)
    d.rounded_rectangle(box, radius=5 * scale, fill=fill,
                        outline=OUTPUT_COLOUR if b.is_output else '#333333',
                        width=(3 if b.is_output else 1) * scale)
    d.text(s(x - 6 if b.index < 10 else x - 9, y - 7), str(b.index),
           fill='white' if b.built else '#777777', font=font)
    if b.is_output:
      d.line(s(x + BOX_W / 2, y, x + BOX_W / 2 + 12, y - 18),
             fill=OUTPUT_COLOUR, width=2 * scale)
      d.text(s(x + BOX_W / 2 + 4, y - 33), f'P{b.level}', fill=OUTPUT_COLOUR,
             font=font)
  lx = MARGIN
  ly = height - 34
  for colour, name in _legend(g) + [(OUTPUT_COLOUR, 'output (P3..P7)'),
                                    (MERGE_COLOUR, 'merged unused block')]:
    d.rectangle(s(lx, ly, lx + 14, ly + 14), fill=colour)
    d.text(s(lx + 19, ly), name, fill='black', font=font)
    lx += 30 + 7 * len(name)
  img.save(path)


def render_svg(g: Graph, path: str) -> None:
  """Writes `g` as an SVG file (block tooltips give type, level, width)."""
  width, height, lo, hi, centre = _layout(g)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
         f'height="{height}" viewBox="0 0 {width} {height}" '
         'font-family="sans-serif" font-size="11">',
         '<defs>' + ''.join(
             f'<marker id="a{i}" markerWidth="8" markerHeight="8" refX="7" '
             f'refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="{c}"/>'
             '</marker>' for i, c in enumerate(
                 (EDGE_COLOUR, MERGE_COLOUR, '#cccccc'))) + '</defs>',
         '<rect width="100%" height="100%" fill="white"/>',
         f'<text x="{MARGIN}" y="28" font-size="15">{_esc(g.title)}</text>']
  for level in range(lo, hi + 1):
    y = MARGIN + 30 + CELL_H * (hi - level) + CELL_H / 2
    out.append(f'<text x="12" y="{y + 4}">L{level}</text>')
    out.append(f'<line x1="{MARGIN + 30}" y1="{y}" x2="{width - 40}" '
               f'y2="{y}" stroke="#eeeeee"/>')
  by_index = {b.index: b for b in g.blocks}
  for b in g.blocks:
    for j, dashed in [(j, False) for j in b.inputs] + [(j, True)
                                                        for j in b.extras]:
      (x0, y0), (x1, y1) = _edge_points(centre(by_index[j]), centre(b))
      m = 1 if dashed else (0 if b.built else 2)
      colour = (EDGE_COLOUR, MERGE_COLOUR, '#cccccc')[m]
      dash = ' stroke-dasharray="5,4"' if dashed else ''
      out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" '
                 f'y2="{y1:.1f}" stroke="{colour}" stroke-width="1.5"{dash} '
                 f'marker-end="url(#a{m})"/>')
  for b in g.blocks:
    x, y = centre(b)
    fill = COLOURS.get(b.kind, '#888888') if b.built else COLOURS['unused']
    stroke = OUTPUT_COLOUR if b.is_output else '#333333'
    sw = 3 if b.is_output else 1
    tip = f'{b.kind}, level {b.level}' + (
        f', {b.channels} channels' if b.channels else '')
    out.append(f'<g><title>{_esc(tip)}</title><rect x="{x - BOX_W / 2}" '
               f'y="{y - BOX_H / 2}" width="{BOX_W}" height="{BOX_H}" rx="5" '
               f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"/>'
               f'<text x="{x}" y="{y + 4}" text-anchor="middle" '
               f'fill="{"white" if b.built else "#777777"}">{b.index}</text>'
               '</g>')
    if b.is_output:
      out.append(f'<text x="{x + BOX_W / 2 + 2}" y="{y - BOX_H / 2 - 3}" '
                 f'fill="{OUTPUT_COLOUR}">P{b.level}</text>')
  lx, ly = MARGIN, height - 34
  for colour, name in _legend(g) + [(OUTPUT_COLOUR, 'output (P3..P7)'),
                                    (MERGE_COLOUR, 'merged unused block')]:
    out.append(f'<rect x="{lx}" y="{ly}" width="14" height="14" '
               f'fill="{colour}"/><text x="{lx + 19}" y="{ly + 11}">'
               f'{_esc(name)}</text>')
    lx += 30 + 7 * len(name)
  out.append('</svg>')
  with open(path, 'w') as f:
    f.write('\n'.join(out) + '\n')


def _esc(text: str) -> str:
  return (text.replace('&', '&amp;').replace('<', '&lt;')
          .replace('>', '&gt;'))


def draw(g: Graph, path: str) -> None:
  """Writes `g` as SVG (a `.svg` path) or a raster image (PNG, ...)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.lower().endswith('.svg'):
    render_svg(g, path)
  else:
    render_png(g, path)


def load_config(path: str) -> Any:
  """`get_config()` of a config file (the repository root on sys.path)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('_draw_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def graph_from_config(config: Any) -> Graph:
  """The graph of the backbone that `config` (`config.model`) builds."""
  return backbone_graph(models.build_model(config).backbone())


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the command-line flags on `fv`."""
  flags.DEFINE_string(
      'model', '49', 'Model id (49S, 49, 96, 143, 190, 49_mobile, ...).',
      flag_values=fv)
  flags.DEFINE_string(
      'config', None, 'A config file; draws the backbone of config.model '
      '(e.g. its block_specs) instead of --model.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Output file: .png or .svg.',
                      flag_values=fv)
  flags.mark_flag_as_required('output', flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Draws --model or --config to --output; `argv` excludes the program."""
  fv = cli.parse_flags('draw', __doc__, define_flags, argv)
  if isinstance(fv, int):
    return fv
  g = graph_from_config(load_config(fv.config)) if fv.config else graph(
      fv.model)
  draw(g, fv.output)
  print(f'Wrote {fv.output}')
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
