"""Drawing scale permutations: graphs of model ids, configs and the CLI."""

from PIL import Image
import pytest

from spinenet_jax import draw


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
