"""Your own data, tried as a new user would: fine-tuning vs from scratch.

  python benchmarks/own_data.py --root=runs/own_data [--demo=runs/demo]
      [--stages=make,prepare,finetune,scratch] [--train=200 --eval=100]

1. `make`: writes a COCO-JSON dataset unlike the demo's as files on disk:
   stars, crosses, rings and hexagons (kinds the demo never saw) on striped,
   checkered and gradient backgrounds (the demo's are cluttered noise),
   200..320 px JPEGs, 1-6 objects of 16-96 px each.
2. `prepare`: the documented command, `python prepare_data.py
   --config=configs/finetune.py --config.data.*=...`.
3. `finetune`: `train.py --config=configs/finetune.py` from the demo run
   (`--demo`, made by `make demo`): backbone and head restored, the class
   predictor re-initialised for 4 + 1 classes.
4. `scratch`: the same command and budget with `--config.init_from=`
   (nothing restored).
Each training stage prints its final COCO AP; the two are compared in the
last lines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
KINDS = ('star', 'cross', 'ring', 'hexagon')  # Category ids 1..4.


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
  a, b = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
  kind = rng.integers(3)
  yy, xx = np.mgrid[:h, :w]
  if kind == 0:  # Stripes at an angle.
    t = rng.uniform(0, math.pi)
    period = rng.uniform(8, 40)
    m = (np.sin((xx * math.cos(t) + yy * math.sin(t)) / period * 2 * math.pi)
         > 0)[..., None]
  elif kind == 1:  # Checkerboard.
    s = int(rng.integers(8, 40))
    m = (((yy // s) + (xx // s)) % 2 == 0)[..., None]
  else:  # Gradient.
    m = (xx / max(w - 1, 1))[..., None]
  pixels = np.asarray(a) * m + np.asarray(b) * (1 - m)
  return Image.fromarray(pixels.astype(np.uint8))


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float):
  if kind == 'star':
    pts = [(r if i % 2 == 0 else 0.45 * r, rot + i * math.pi / 5)
           for i in range(10)]
  elif kind == 'hexagon':
    pts = [(r, rot + i * math.pi / 3) for i in range(6)]
  else:  # Cross: 12 corners of a plus sign.
    a = 0.33 * r
    xy = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r),
          (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    pts = [(math.hypot(x, y), math.atan2(y, x) + rot) for x, y in xy]
  return [(cx + d * math.cos(t), cy + d * math.sin(t)) for d, t in pts]


def render(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
  h, w = (int(v) for v in rng.integers(200, 321, 2))
  image = _background(rng, h, w)
  anns = []
  for _ in range(int(rng.integers(1, 7))):
    kind = int(rng.integers(len(KINDS)))
    r = rng.uniform(8, 48)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    mask = Image.new('L', (w, h))
    draw = ImageDraw.Draw(mask)
    if KINDS[kind] == 'ring':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
      q = 0.55 * r
      draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
      draw.polygon(_polygon(KINDS[kind], cx, cy, r, rng.uniform(0, 6.3)),
                   fill=255)
    box = mask.getbbox()
    if box is None:
      continue
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    image.paste(colour, box, mask.crop(box))
    x0, y0, x1, y1 = box
    anns.append({'category_id': kind + 1,
                 'bbox': [x0, y0, x1 - x0, y1 - y0], 'iscrowd': 0,
                 'area': float((np.asarray(mask) > 0).sum())})
  noise = rng.normal(0, 4, (h, w, 3))
  image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255)
                          .astype(np.uint8))
  return image, anns


def make(root: Path, n_train: int, n_eval: int, seed: int = 7) -> None:
  for split, n in (('train', n_train), ('val', n_eval)):
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, split == 'val'))
    coco = {'images': [], 'annotations': [], 'categories': [
        {'id': i + 1, 'name': k} for i, k in enumerate(KINDS)]}
    for i in range(n):
      image, anns = render(rng)
      name = f'{split}_{i:05d}.jpg'
      image.save(folder / name, quality=92)
      image_id = 100_000 + i
      coco['images'].append({'id': image_id, 'file_name': name,
                             'height': image.height, 'width': image.width})
      for a in anns:
        coco['annotations'].append({**a, 'id': len(coco['annotations']) + 1,
                                    'image_id': image_id})
    (root / f'{split}.json').write_text(json.dumps(coco))
  print(f'Wrote {n_train} + {n_eval} images and their COCO JSON to {root}.')


def data_flags(root: Path) -> list[str]:
  return [f'--config.data.train_annotations={root / "train.json"}',
          f'--config.data.train_images={root / "train"}',
          f'--config.data.eval_annotations={root / "val.json"}',
          f'--config.data.eval_images={root / "val"}']


def run(cmd: list[str], log: Path) -> str:
  print('$', ' '.join(cmd), flush=True)
  t = time.time()
  with open(log, 'w') as f:
    subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                   check=True)
  print(f'  ({time.time() - t:.0f} s, log {log})', flush=True)
  return log.read_text()


def final_ap(workdir: Path) -> dict[str, float]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text()
           .splitlines() if '"AP"' in l]
  return lines[-1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--root', default='runs/own_data')
  p.add_argument('--demo', default='runs/demo')
  p.add_argument('--stages', default='make,prepare,finetune,scratch')
  p.add_argument('--train', type=int, default=200)
  p.add_argument('--eval', type=int, default=100)
  args = p.parse_args()
  root = Path(args.root).resolve()
  data, stages = root / 'data', args.stages.split(',')
  base = [sys.executable]
  config = '--config=configs/finetune.py'
  if 'make' in stages:
    make(data, args.train, args.eval)
  if 'prepare' in stages:
    print(run(base + ['prepare_data.py', config, *data_flags(data)],
              root / 'prepare.log').split('Preparing', 1)[-1][-3000:])
  results = {}
  for stage, init in (('finetune', args.demo), ('scratch', '')):
    if stage not in stages:
      continue
    workdir = root / stage
    if workdir.exists():
      subprocess.run(['rm', '-rf', str(workdir)], check=True)
    run(base + ['train.py', config, f'--workdir={workdir}',
                f'--config.init_from={init}', *data_flags(data)],
        root / f'{stage}.log')
    results[stage] = final_ap(workdir)
    print(f'{stage}: AP {results[stage]["AP"]:.3f} AP50 '
          f'{results[stage]["AP50"]:.3f}', flush=True)
  print(f'\nCPU {os.cpu_count()} cores, load average '
        f'{os.getloadavg()[0]:.2f}')
  for stage, m in results.items():
    print(f'| {stage} | {m["AP"]:.3f} | {m["AP50"]:.3f} | {m["AP75"]:.3f} |')


if __name__ == '__main__':
  main()
