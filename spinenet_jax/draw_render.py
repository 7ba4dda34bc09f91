"""PNG and SVG rendering of the graphs of `spinenet_jax.draw`.

`render_png` / `render_svg` draw one graph; `mark_blocks` / `mark_edges`
outline blocks and highlight edges (a search-space diff). `render_diff_png` /
`render_diff_svg` stack two such drawings under a summary line.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Collection

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
  from spinenet_jax.draw import Block, Graph

COLOURS = {'stem': '#9e9e9e', 'bottleneck': '#4e79a7', 'residual': '#f28e2b',
           'mbconv': '#59a14f', 'unused': '#dddddd'}
EDGE_COLOUR = '#555555'
MERGE_COLOUR = '#b07aa1'
OUTPUT_COLOUR = '#d62728'
DIFF_COLOUR = '#e6007e'  # Magenta: blocks and edges that differ.
UNBUILT_EDGE = '#cccccc'

Edge = tuple[int, int, bool]  # (source index, target index, merged/dashed)

# ------------------------------------------------------------------ layout

CELL_W, CELL_H, BOX_W, BOX_H, MARGIN = 70, 62, 46, 30, 60
HEADER_H = 40  # Summary line above the two drawings of a diff.


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


def _legend(g: Graph, diff: bool) -> list[tuple[str, str]]:
  kinds = ['stem'] + sorted({b.kind for b in g.blocks if b.kind != 'stem'})
  items = [(COLOURS.get(k, '#888888'), k) for k in kinds]
  if any(not b.built for b in g.blocks):
    items.append((COLOURS['unused'], 'not built'))
  items += [(OUTPUT_COLOUR, 'output (P3..P7)'),
            (MERGE_COLOUR, 'merged unused block')]
  return items + [(DIFF_COLOUR, 'differs')] if diff else items


def _edges(g: Graph, mark_edges: Collection[Edge]
           ) -> list[tuple[Block, Block, bool, bool]]:
  """(source, target, dashed, marked), the marked ones last (drawn on top)."""
  by_index = {b.index: b for b in g.blocks}
  out = [(by_index[j], by_index[t], dashed, (j, t, dashed) in mark_edges)
         for j, t, dashed in g.edges()]
  return sorted(out, key=lambda e: e[3])


def _edge_colour(target: Block, dashed: bool, marked: bool) -> str:
  if marked:
    return DIFF_COLOUR
  return MERGE_COLOUR if dashed else (
      EDGE_COLOUR if target.built else UNBUILT_EDGE)


def _fonts(scale: int) -> tuple[ImageFont.ImageFont, ImageFont.ImageFont]:
  try:
    return (ImageFont.load_default(size=11 * scale),
            ImageFont.load_default(size=15 * scale))
  except TypeError:  # Old Pillow: fixed-size bitmap font.
    font = ImageFont.load_default()
    return font, font


# --------------------------------------------------------------------- PNG

def png_image(g: Graph, scale: int = 2,
              mark_blocks: Collection[int] | None = None,
              mark_edges: Collection[Edge] | None = None) -> Image.Image:
  """`g` as a PIL image; marked blocks/edges (a diff) in magenta."""
  width, height, lo, hi, centre = _layout(g)
  marked_blocks, marked_edges = set(mark_blocks or ()), set(mark_edges or ())
  img = Image.new('RGB', (width * scale, height * scale), 'white')
  d = ImageDraw.Draw(img)
  font, big = _fonts(scale)
  s = lambda *xy: [v * scale for v in xy]
  d.text(s(MARGIN, 14), g.title, fill='black', font=big)
  for level in range(lo, hi + 1):
    y = MARGIN + 30 + CELL_H * (hi - level) + CELL_H / 2
    d.text(s(12, y - 7), f'L{level}', fill='black', font=font)
    d.line(s(MARGIN + 30, y, width - 40, y), fill='#eeeeee', width=scale)
  for src, b, dashed, marked in _edges(g, marked_edges):
    (x0, y0), (x1, y1) = _edge_points(centre(src), centre(b))
    colour = _edge_colour(b, dashed, marked)
    if dashed:
      n = max(int(math.hypot(x1 - x0, y1 - y0) // 8), 1)
      for k in range(0, n, 2):
        t0, t1 = k / n, min((k + 1) / n, 1)
        d.line(s(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0,
                 x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1),
               fill=colour, width=(4 if marked else 2) * scale)
    else:
      d.line(s(x0, y0, x1, y1), fill=colour,
             width=3 * scale if marked else scale + scale // 2)
    d.polygon([tuple(v * scale for v in p) for p in
               _arrow_head(x0, y0, x1, y1, 10 if marked else 7)], fill=colour)
  for b in g.blocks:
    x, y = centre(b)
    fill = COLOURS.get(b.kind, '#888888') if b.built else COLOURS['unused']
    box = s(x - BOX_W / 2, y - BOX_H / 2, x + BOX_W / 2, y + BOX_H / 2)
    if b.index in marked_blocks:
      d.rounded_rectangle(s(x - BOX_W / 2 - 5, y - BOX_H / 2 - 5,
                            x + BOX_W / 2 + 5, y + BOX_H / 2 + 5),
                          radius=8 * scale, outline=DIFF_COLOUR,
                          width=3 * scale)
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
  lx, ly = MARGIN, height - 34
  diff = mark_blocks is not None or mark_edges is not None
  for colour, name in _legend(g, diff):
    d.rectangle(s(lx, ly, lx + 14, ly + 14), fill=colour)
    d.text(s(lx + 19, ly), name, fill='black', font=font)
    lx += 30 + 7 * len(name)
  return img


def render_png(g: Graph, path: str, scale: int = 2,
               mark_blocks: Collection[int] | None = None,
               mark_edges: Collection[Edge] | None = None) -> None:
  """Writes `g` as a raster image (format from the extension of `path`)."""
  png_image(g, scale, mark_blocks, mark_edges).save(path)


def render_diff_png(a: Graph, b: Graph, path: str, summary: str,
                    marks_a: tuple[Collection[int], Collection[Edge]],
                    marks_b: tuple[Collection[int], Collection[Edge]],
                    side_by_side: bool = False, scale: int = 2) -> None:
  """Writes `a` above (or left of) `b` under a `summary` line."""
  ia, ib = png_image(a, scale, *marks_a), png_image(b, scale, *marks_b)
  top = HEADER_H * scale
  if side_by_side:
    size = (ia.width + ib.width, top + max(ia.height, ib.height))
    at = (ia.width, top)
  else:
    size = (max(ia.width, ib.width), top + ia.height + ib.height)
    at = (0, top + ia.height)
  img = Image.new('RGB', size, 'white')
  img.paste(ia, (0, top))
  img.paste(ib, at)
  d = ImageDraw.Draw(img)
  d.text((MARGIN * scale, 12 * scale), summary, fill=DIFF_COLOUR,
         font=_fonts(scale)[1])
  if side_by_side:
    d.line((ia.width, top, ia.width, size[1]), fill='#bbbbbb', width=scale)
  else:
    d.line((0, at[1], size[0], at[1]), fill='#bbbbbb', width=scale)
  img.save(path)


# --------------------------------------------------------------------- SVG

_MARKERS = (EDGE_COLOUR, MERGE_COLOUR, UNBUILT_EDGE, DIFF_COLOUR)


def _svg_open(width: int, height: int) -> list[str]:
  return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
          f'height="{height}" viewBox="0 0 {width} {height}" '
          'font-family="sans-serif" font-size="11">',
          '<defs>' + ''.join(
              f'<marker id="a{i}" markerWidth="8" markerHeight="8" refX="7" '
              f'refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" '
              f'fill="{c}"/></marker>' for i, c in enumerate(_MARKERS))
          + '</defs>',
          f'<rect width="{width}" height="{height}" fill="white"/>']


def svg_elements(g: Graph, mark_blocks: Collection[int] | None = None,
                 mark_edges: Collection[Edge] | None = None
                 ) -> tuple[int, int, list[str]]:
  """(width, height, SVG elements) of `g`, for the document of `_svg_open`."""
  width, height, lo, hi, centre = _layout(g)
  marked_blocks, marked_edges = set(mark_blocks or ()), set(mark_edges or ())
  out = [f'<text x="{MARGIN}" y="28" font-size="15">{_esc(g.title)}</text>']
  for level in range(lo, hi + 1):
    y = MARGIN + 30 + CELL_H * (hi - level) + CELL_H / 2
    out.append(f'<text x="12" y="{y + 4}">L{level}</text>')
    out.append(f'<line x1="{MARGIN + 30}" y1="{y}" x2="{width - 40}" '
               f'y2="{y}" stroke="#eeeeee"/>')
  for src, b, dashed, marked in _edges(g, marked_edges):
    (x0, y0), (x1, y1) = _edge_points(centre(src), centre(b))
    colour = _edge_colour(b, dashed, marked)
    m = _MARKERS.index(colour)
    dash = ' stroke-dasharray="5,4"' if dashed else ''
    cls = ' class="differs"' if marked else ''
    out.append(f'<line{cls} x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" '
               f'y2="{y1:.1f}" stroke="{colour}" '
               f'stroke-width="{3 if marked else 1.5}"{dash} '
               f'marker-end="url(#a{m})"/>')
  for b in g.blocks:
    x, y = centre(b)
    fill = COLOURS.get(b.kind, '#888888') if b.built else COLOURS['unused']
    stroke = OUTPUT_COLOUR if b.is_output else '#333333'
    sw = 3 if b.is_output else 1
    tip = f'{b.kind}, level {b.level}' + (
        f', {b.channels} channels' if b.channels else '')
    ring = ''
    if b.index in marked_blocks:
      tip += ' (differs)'
      ring = (f'<rect class="differs" x="{x - BOX_W / 2 - 5}" '
              f'y="{y - BOX_H / 2 - 5}" width="{BOX_W + 10}" '
              f'height="{BOX_H + 10}" rx="8" fill="none" '
              f'stroke="{DIFF_COLOUR}" stroke-width="3"/>')
    out.append(f'<g><title>{_esc(tip)}</title>{ring}<rect '
               f'x="{x - BOX_W / 2}" y="{y - BOX_H / 2}" width="{BOX_W}" '
               f'height="{BOX_H}" rx="5" fill="{fill}" stroke="{stroke}" '
               f'stroke-width="{sw}"/><text x="{x}" y="{y + 4}" '
               f'text-anchor="middle" '
               f'fill="{"white" if b.built else "#777777"}">{b.index}</text>'
               '</g>')
    if b.is_output:
      out.append(f'<text x="{x + BOX_W / 2 + 2}" y="{y - BOX_H / 2 - 3}" '
                 f'fill="{OUTPUT_COLOUR}">P{b.level}</text>')
  lx, ly = MARGIN, height - 34
  diff = mark_blocks is not None or mark_edges is not None
  for colour, name in _legend(g, diff):
    out.append(f'<rect x="{lx}" y="{ly}" width="14" height="14" '
               f'fill="{colour}"/><text x="{lx + 19}" y="{ly + 11}">'
               f'{_esc(name)}</text>')
    lx += 30 + 7 * len(name)
  return width, height, out


def render_svg(g: Graph, path: str,
               mark_blocks: Collection[int] | None = None,
               mark_edges: Collection[Edge] | None = None) -> None:
  """Writes `g` as an SVG file (block tooltips give type, level, width)."""
  width, height, body = svg_elements(g, mark_blocks, mark_edges)
  _write(path, _svg_open(width, height) + body + ['</svg>'])


def render_diff_svg(a: Graph, b: Graph, path: str, summary: str,
                    marks_a: tuple[Collection[int], Collection[Edge]],
                    marks_b: tuple[Collection[int], Collection[Edge]],
                    side_by_side: bool = False) -> None:
  """Writes `a` above (or left of) `b` as two translated <g> groups."""
  wa, ha, body_a = svg_elements(a, *marks_a)
  wb, hb, body_b = svg_elements(b, *marks_b)
  if side_by_side:
    width, height, at = wa + wb, HEADER_H + max(ha, hb), (wa, HEADER_H)
  else:
    width, height, at = max(wa, wb), HEADER_H + ha + hb, (0, HEADER_H + ha)
  out = _svg_open(width, height) + [
      f'<text x="{MARGIN}" y="26" font-size="15" fill="{DIFF_COLOUR}">'
      f'{_esc(summary)}</text>',
      f'<g id="a" transform="translate(0,{HEADER_H})">', *body_a, '</g>',
      f'<g id="b" transform="translate({at[0]},{at[1]})">', *body_b, '</g>',
      (f'<line x1="{wa}" y1="{HEADER_H}" x2="{wa}" y2="{height}" '
       if side_by_side else
       f'<line x1="0" y1="{at[1]}" x2="{width}" y2="{at[1]}" ')
      + 'stroke="#bbbbbb"/>', '</svg>']
  _write(path, out)


def _write(path: str, lines: list[str]) -> None:
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _esc(text: str) -> str:
  return (text.replace('&', '&amp;').replace('<', '&lt;')
          .replace('>', '&gt;'))
