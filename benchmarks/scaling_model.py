"""A scaling model on paper: data-parallel SpineNet RetinaNet on 8-256 chips.

  python benchmarks/scaling_model.py [--mfu 0.4] [--overlap 0]
      [--macs_49 M --params_49 P --macs_190 M --params_190 P]

Predicts the step time and scaling efficiency of data-parallel training
(global batch 256) of SpineNet-49 at 640 px and SpineNet-190 at 1280 px on
TPU v4, TPU v5p and NVIDIA H100 SXM, and the images/s each host's input
pipeline must sustain. Nothing is run on an accelerator; every figure follows
from the formulas and assumptions below.

Model:
- Forward MACs and parameters per image are measured from the model
  (`spinenet_jax.summary.summarize`: the forward pass is traced, not compiled
  or run; RetinaNet, 91 classes), or given with --macs_* / --params_*.
- Compute per step = 3 x forward FLOPs (forward + backward ~ 3x forward;
  FLOPs = 2 x MACs) x per-chip batch / (peak bf16 FLOP/s x MFU). The MFU
  (model FLOPs utilisation, default 0.4 for convnets) is an assumption, not a
  measurement, and is the same on every chip and at every per-chip batch
  (small per-chip batches will in practice run at a lower MFU).
- Communication per step = gradient all-reduce of 4 bytes x parameters
  (float32 gradients) + batch-norm reductions. `step_audit.py` checks that a
  data-parallel step's collectives are exactly these; the batch-norm part is
  at most 2 x the bytes of `batch_stats` (counted when the model is traced,
  else left out), well under 1% of the gradients: negligible.
- All-reduce time, bandwidth term only (per-hop latency ignored; it matters
  for the many small batch-norm all-reduces, which are not modelled):
  - TPU (one ICI slice): ring, 2 (n-1)/n x bytes / B, B = all-reduce bandwidth
    per chip;
  - H100, hierarchical: reduce-scatter in the node over NVLink, all-reduce of
    each GPU's 1/g shard across the m = n/g nodes over its own InfiniBand
    NIC, all-gather in the node: 2 (g-1)/g x bytes / B_nvlink +
    2 (m-1)/m x bytes / (g x B_ib), g = 8 GPUs per node.
- Step = compute + communication - hidden, hidden = min(overlap x
  communication, backward = 2/3 of compute); --overlap 0 (default) hides
  nothing, so the figures are conservative.
- Efficiency = per-chip throughput relative to 8 chips = 8 T_8 / (n T_n).
- Input pipeline: images/s per host = 256 / step / hosts, hosts = n / 4 (TPU
  v4, v5p) or n / 8 (H100 nodes).

Peak figures (per chip):
- TPU v4: 275 TFLOP/s bf16, 6 ICI links (3D torus); all-reduce bandwidth per
  Pod 1.1 PB/s over 4096 chips = 269 GB/s per chip. Source: Google Cloud TPU
  docs, "TPU v4", System architecture (cloud.google.com/tpu/docs/v4).
- TPU v5p: 459 TFLOP/s bf16, ICI 4800 Gbps = 600 GB/s per chip (1200 GB/s
  bidirectional), taken as the all-reduce bandwidth (v5e's docs give
  all-reduce bandwidth = half the bidirectional ICI bandwidth too). Source:
  Google Cloud TPU docs, "TPU v5p", System architecture
  (cloud.google.com/tpu/docs/v5p).
- H100 SXM: 989 TFLOP/s dense bf16 (the datasheet's 1979 is with
  sparsity), NVLink 900 GB/s per GPU bidirectional = 450 GB/s each way,
  InfiniBand 400 Gb/s = 50 GB/s per GPU (one NDR NIC per GPU, 8 per node).
  Source: NVIDIA H100 Tensor Core GPU datasheet.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

GLOBAL_BATCH = 256
CHIPS = (8, 16, 32, 64, 128, 256)
CASES = (('49', 640), ('190', 1280))


@dataclasses.dataclass(frozen=True)
class Chip:
  """Peak figures of one accelerator (bandwidths in bytes/s, each way)."""
  name: str
  flops: float  # peak dense bf16 FLOP/s
  allreduce_bw: float  # TPU: all-reduce bandwidth per chip; H100: NVLink
  per_host: int  # chips per host / node
  ib_bw: float = 0.0  # H100 only: InfiniBand per GPU

  def allreduce_s(self, nbytes: float, n: int) -> float:
    """Bandwidth term of an all-reduce of `nbytes` over `n` chips."""
    if not self.ib_bw:  # one TPU slice: ring over ICI
      return 2 * (n - 1) / n * nbytes / self.allreduce_bw
    g = min(n, self.per_host)
    m = n // g
    return (2 * (g - 1) / g * nbytes / self.allreduce_bw +
            2 * (m - 1) / m * nbytes / (g * self.ib_bw))


CHIP_LIST = (
    Chip('v4', 275e12, 1.1e15 / 4096, per_host=4),
    Chip('v5p', 459e12, 4800e9 / 8, per_host=4),
    Chip('H100', 989e12, 900e9 / 2, per_host=8, ib_bw=400e9 / 8),
)


def measure(model_id: str, image_size: int) -> tuple[int, int, int]:
  """(forward MACs per image, parameters, batch-norm stats bytes) traced."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from spinenet_jax import models  # pylint: disable=g-import-not-at-top
  from spinenet_jax import summary  # pylint: disable=g-import-not-at-top
  model = models.RetinaNet(model_id=model_id)
  info = summary.summarize(model, image_size)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jax.numpy.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  stats = sum(4 * a.size for a in jax.tree.leaves(variables['batch_stats']))
  return info['macs'], info['params'], stats


def step_ms(chip: Chip, n: int, macs: float, params: float, bn_bytes: float,
            mfu: float, overlap: float) -> float:
  """Predicted step time (ms) on `n` chips at global batch 256."""
  compute = 3 * 2 * macs * (GLOBAL_BATCH / n) / (chip.flops * mfu)
  comm = chip.allreduce_s(4 * params + 2 * bn_bytes, n)
  hidden = min(overlap * comm, 2 / 3 * compute)
  return 1e3 * (compute + comm - hidden)


def table(model_id: str, size: int, macs: float, params: float,
          bn_bytes: float, mfu: float, overlap: float) -> list[str]:
  """Markdown rows (and notes) for one model."""
  grad_mb = 4 * params / 1e6
  bn = (f'{2 * bn_bytes / 1e6:.2f} MB ({100 * 2 * bn_bytes / (4 * params):.2f}'
        '% of the gradients)' if bn_bytes else 'not counted (not traced)')
  lines = [f'### SpineNet-{model_id} @{size}: {macs / 1e9:.1f}B MACs/image, '
           f'{params / 1e6:.1f}M params ({macs / params:,.0f} MACs per '
           f'parameter), gradients {grad_mb:.0f} MB, batch-norm reductions '
           f'{bn}', '',
           '| chips | per-chip batch | v4 step (ms) | v4 eff | v5p step (ms) | '
           'v5p eff | H100 step (ms) | H100 eff | images/s per host '
           '(v4 / v5p / H100) |', '|---|---|---|---|---|---|---|---|---|']
  times = {c.name: {n: step_ms(c, n, macs, params, bn_bytes, mfu, overlap)
                    for n in CHIPS} for c in CHIP_LIST}
  notes = []
  for n in CHIPS:
    b = GLOBAL_BATCH / n
    cells = [str(n), f'{b:g}']
    for c in CHIP_LIST:
      t = times[c.name][n]
      cells += [f'{t:.1f}', f'{8 * times[c.name][8] / (n * t):.0%}']
    cells.append(' / '.join(
        f'{GLOBAL_BATCH / (times[c.name][n] / 1e3) / (n / c.per_host):,.0f}'
        for c in CHIP_LIST))
    lines.append('| ' + ' | '.join(cells) + ' |')
    if b <= 2:
      notes.append(f'{n} chips: {b:g} image{"s" * (b > 1)} per chip at '
                   f'{size} px: batch norm must reduce over the global batch '
                   '(as the recipe does), and the MFU assumed is optimistic.')
  if size >= 1024:
    notes.append(f'More than 1-2 images of {size} px per chip are not known '
                 'to fit (v4 32 GiB, H100 80 GB, v5p 95 GB) without '
                 'rematerialisation or spatial partitioning: see '
                 '`pod_memory.py`.')
  return lines + [''] + [f'- {n}' for n in notes] + ['']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mfu', type=float, default=0.4,
                      help='Assumed achieved MFU (not measured).')
  parser.add_argument('--overlap', type=float, default=0.0,
                      help='Fraction of communication hidden by backward.')
  for model_id, _ in CASES:
    parser.add_argument(f'--macs_{model_id}', type=float,
                        help='Forward MACs per image (skips tracing).')
    parser.add_argument(f'--params_{model_id}', type=float,
                        help='Parameters (skips tracing).')
  args = parser.parse_args()

  print(f'# Scaling model on paper: data parallel, global batch '
        f'{GLOBAL_BATCH}\n')
  print(f'Assumed MFU {args.mfu:g} (an assumption, not a measurement); '
        f'communication overlap {args.overlap:g}; compute = 3 x 2 x MACs x '
        'per-chip batch / (peak x MFU); gradients float32, all-reduce '
        'bandwidth term only (TPU ring 2(n-1)/n x bytes / B; H100 '
        'hierarchical NVLink + InfiniBand); batch-norm reductions included, '
        'negligible. Peaks: ' + '; '.join(
            f'{c.name} {c.flops / 1e12:g} TFLOP/s bf16, all-reduce '
            + (f'{c.allreduce_bw / 1e9:.0f} GB/s' if not c.ib_bw else
               f'NVLink {c.allreduce_bw / 1e9:.0f} GB/s + IB '
               f'{c.ib_bw / 1e9:.0f} GB/s') + f', {c.per_host} per host'
            for c in CHIP_LIST) + '. Efficiency = per-chip throughput '
        'relative to 8 chips.\n')
  for model_id, size in CASES:
    macs = getattr(args, f'macs_{model_id}')
    params = getattr(args, f'params_{model_id}')
    bn_bytes = 0
    if macs is None or params is None:
      macs, params, bn_bytes = measure(model_id, size)
    print('\n'.join(table(model_id, size, macs, params, bn_bytes, args.mfu,
                          args.overlap)), flush=True)


if __name__ == '__main__':
  main()
