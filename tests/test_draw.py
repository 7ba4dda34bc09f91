"""Drawing scale permutations: graphs of model ids, configs and the CLI."""

import json
from xml.etree import ElementTree

import numpy as np
from PIL import Image
import pytest

from spinenet_jax import draw
from spinenet_jax import specs as specs_lib


def test_draw_spinenet49(tmp_path):
  g = draw.graph('49')
  assert len(g.blocks) == 18
  assert sorted(b.level for b in g.blocks if b.is_output) == [3, 4, 5, 6, 7]
  assert not g.blocks[-1].built  # The dead level-2 block.
  assert any(b.extras for b in g.blocks)  # A merged unused block.
  draw.main(['--model=49', f'--output={tmp_path / "sn49.png"}'])
  with Image.open(tmp_path / 'sn49.png') as im:
    assert im.size[0] > 500 and im.size[1] > 200
  draw.main(['--model=49_mobile', f'--output={tmp_path / "m.svg"}'])
  assert (tmp_path / 'm.svg').read_text().startswith('<svg')


def test_draw_custom_permutation(tmp_path):
  cfg = tmp_path / 'custom.py'
  cfg.write_text('''
import ml_collections
def get_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(model_id='49', block_specs=[
      (3, 'bottleneck', (0, 1), False),
      (4, 'residual', (0, 2), False),
      (5, 'bottleneck', (2, 3), False),
      (3, 'bottleneck', (2, 4), True),
      (4, 'bottleneck', (3, 5), True),
      (5, 'bottleneck', (4, 6), True),
      (6, 'residual', (6, 7), True),
      (7, 'residual', (7, 8), True),
  ]))
  return c
''')
  out = tmp_path / 'custom.png'
  draw.main([f'--config={cfg}', f'--output={out}'])
  with Image.open(out) as im:
    assert im.size[0] > 300
  g = draw.graph_from_config(draw.load_config(str(cfg)))
  assert len(g.blocks) == 10 and 'custom' in g.title
  with pytest.raises(ValueError, match='Block 1'):
    draw.graph('49', [(3, 'bottleneck', (0, 1), False),
                      (4, 'bottleneck', (0, 5), True)])


# -------------------------------------------------------------------- diff

def _write_json(path, specs, **extra):
  path.write_text(json.dumps({'block_specs': [list(s) for s in specs],
                              **extra}))
  return str(path)


def _specs_49():
  return [[s.level, s.block_fn, list(s.input_offsets), s.is_output]
          for s in specs_lib.SPINENET_BLOCK_SPECS]


def test_diff_same_model_reports_nothing(tmp_path):
  a, b = draw.load_graph('49'), draw.load_graph('49')
  result = draw.diff(a, b)
  assert result.same and result.blocks == () and result.edges == ()
  assert result.summary == 'nothing differs'
  # The same permutation from a JSON file and a BLOCK_SPECS .py: no diff.
  j = draw.load_graph(_write_json(tmp_path / 'same.json', _specs_49()))
  assert j.title.startswith('same.json: custom permutation')
  (tmp_path / 'best.py').write_text(
      f'BLOCK_SPECS = tuple(tuple(s) for s in {_specs_49()!r})\n')
  p = draw.load_graph(str(tmp_path / 'best.py'), title='searched')
  assert p.title == 'searched'
  assert draw.diff(a, j).same and draw.diff(a, p).same
  (tmp_path / 'cfg.py').write_text(
      'import ml_collections\n'
      'def get_config():\n'
      '  return ml_collections.ConfigDict(dict(model=dict(model_id="49")))\n')
  c = draw.load_graph(str(tmp_path / 'cfg.py'))
  assert c.title == 'cfg.py: SpineNet-49' and draw.diff(a, c).same


def test_diff_one_parent_changed(tmp_path, capsys):
  specs = _specs_49()
  specs[11][2] = [4, 8]  # Block 13 (spec 11) reads 8 instead of 10.
  src = _write_json(tmp_path / 'best_block_specs.json', specs,
                    model_id='49', score=0.5)
  result = draw.diff(draw.load_graph('49'), draw.load_graph(src))
  assert result.blocks == (13,)
  assert result.edges_a == ((10, 13, False),)
  assert result.edges_b == ((8, 13, False),)
  assert result.summary == '1 block, 2 edges differ'
  assert result.details[0] == 'block 13: inputs (4, 10) vs (4, 8)'
  png, svg = tmp_path / 'diff.png', tmp_path / 'out' / 'diff.svg'
  assert draw.main(['--diff=49', f'--diff={src}', f'--output={png}']) == 0
  assert '1 block, 2 edges differ' in capsys.readouterr().out
  with Image.open(png) as im:  # Two drawings stacked: twice as tall.
    assert im.size[0] > 500 and im.size[1] > 2 * 400
    rgb = np.asarray(im.convert('RGB'))
  assert (rgb == (0xe6, 0x00, 0x7e)).all(-1).any()  # The magenta highlight.
  assert draw.main(['--diff=49', f'--diff={src}', f'--output={svg}']) == 0
  text = svg.read_text()
  ElementTree.fromstring(text)  # Well-formed.
  assert text.startswith('<svg') and text.count('<g id=') == 2
  assert 'differs' in text and 'A vs B: 1 block, 2 edges differ' in text
  # One ring round block 13 on each side, one edge on each side.
  assert text.count('<rect class="differs"') == 2
  assert text.count('<line class="differs"') == 2


def test_diff_mobile_and_different_lengths(tmp_path):
  result = draw.diff(draw.load_graph('49'), draw.load_graph('49_mobile'))
  assert not result.same
  assert 0 in result.blocks  # Stem level 2 vs 1.
  assert all(i in result.blocks for i in range(2, 18))  # Block types.
  draw.draw_diff(draw.load_graph('49'), draw.load_graph('49_mobile'),
                 str(tmp_path / 'm.png'), side_by_side=True)
  with Image.open(tmp_path / 'm.png') as im:
    assert im.size[0] > 2 * 1000
  short = [[3, 'bottleneck', [0, 1], False], [4, 'residual', [0, 2], False],
           [5, 'bottleneck', [2, 3], False], [3, 'bottleneck', [2, 4], True],
           [4, 'bottleneck', [3, 5], True], [5, 'bottleneck', [4, 6], True],
           [6, 'residual', [6, 7], True], [7, 'residual', [7, 8], True]]
  src = _write_json(tmp_path / 'short.json', short)
  a, b = draw.load_graph('49'), draw.load_graph(src)
  result = draw.diff(a, b)
  assert set(range(10, 18)) <= set(result.blocks)  # Only in A.
  assert 'block 17: only in A (bottleneck, level 2)' in result.details
  assert all(t >= 2 for _, t, _ in result.edges)
  svg = tmp_path / 'short.svg'
  draw.draw_diff(a, b, str(svg))
  # Block 17 is ringed in A only; blocks 2..9 (all changed) on both sides.
  assert svg.read_text().count('<rect class="differs"') == 8 * 2 + 8


@pytest.mark.parametrize('source, match', [
    ('missing.json', 'missing.json: no such file'),
    ('no/such/config.py', 'no/such/config.py: no such file'),
    ('50', "'50' is neither a file nor a known model id"),
])
def test_diff_bad_source(source, match):
  with pytest.raises(draw.SourceError, match=match) as e:
    draw.load_graph(source)
  assert 'a model id' in str(e.value) and '.json' in str(e.value)


def test_diff_bad_files_and_flags(tmp_path, capsys):
  bad = tmp_path / 'bad.json'
  bad.write_text('{"block_specs": [')
  with pytest.raises(draw.SourceError, match='bad.json: not readable JSON'):
    draw.load_graph(str(bad))
  bad.write_text('[[3, "bottleneck", [0, 1], true]]')
  with pytest.raises(draw.SourceError, match='without a "block_specs" list'):
    draw.load_graph(str(bad))
  bad.write_text('{"block_specs": [[3, "bottleneck", [0, 9], true]]}')
  with pytest.raises(draw.SourceError, match='bad.json: ValueError'):
    draw.load_graph(str(bad))
  (tmp_path / 'empty.py').write_text('X = 1\n')
  with pytest.raises(draw.SourceError, match='neither get_config'):
    draw.load_graph(str(tmp_path / 'empty.py'))
  out = f'--output={tmp_path / "d.png"}'
  assert draw.main(['--diff=49', f'--diff={tmp_path / "nope.json"}', out]) == 2
  assert 'nope.json: no such file' in capsys.readouterr().err
  assert draw.main(['--diff=49', out]) == 2
  assert 'two sources' in capsys.readouterr().err
  assert draw.main(['--diff=49', '--diff=49', '--model=96', out]) == 2
  assert draw.main(['--diff=49', '--diff=49S']) == 2  # --output required.
  assert not (tmp_path / 'd.png').exists()
