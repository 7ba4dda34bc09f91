"""Where our SpineNet-49 RetinaNet spends its time on XLA:CPU, by op category.

  python benchmarks/profile_step.py [--case=train256] [--iters=3]

Cases are those of `vs_model_garden.py` (the same programs: forward640,
infer640, train256, train640). Traces `--iters` calls with `jax.profiler`,
sums the duration of every executed HLO op (all threads) and maps each op to a
category through the compiled module's metadata: convolution forward /
input-gradient / filter-gradient by kernel size (1x1 convolutions are
matmuls), batch norm, activations, resampling, head (other than its convs and
norms), loss and targets, optimizer. Prints each category's busy milliseconds
per call and its share.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax

import vs_model_garden  # benchmarks/, beside this script

_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)\{?[\d,]*\}? (\w[\w\-]*)\(')
_SHAPE = re.compile(r'\[([\d,]*)\]')


def _parse(hlo: str) -> tuple[dict, dict]:
  """Instructions by name: (opcode, shape, line); computations' lines."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    if line.endswith('{') and ('%' in line.split('(')[0]):
      current = line.split('%', 1)[1].split(' ', 1)[0]
      continue
    m = _INSTR.match(line)
    if m:
      instrs[m.group(1)] = (m.group(3), m.group(2), line)
      comps[current].append(m.group(1))
  return instrs, comps


def _kernel_op(name: str, instrs: dict, comps: dict):
  """The convolution or dot an executed op performs, if any (its line)."""
  opcode, _, line = instrs[name]
  if opcode in ('convolution', 'dot'):
    return opcode, line
  called = re.search(r'calls=%([\w.\-]+)', line)
  if opcode == 'fusion' and called:
    for inner in comps.get(called.group(1), []):
      op, _, inner_line = instrs[inner]
      if op in ('convolution', 'dot'):
        return op, inner_line
  return None


def _dims(shape: str) -> list[int]:
  m = _SHAPE.search(shape)
  return [int(d) for d in m.group(1).split(',') if d] if m else []


def category(name: str, instrs: dict, comps: dict) -> str:
  """The category of the executed HLO op `name`."""
  if name not in instrs:
    return 'other'
  line = instrs[name][2]
  op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ''])[1]
  back = 'transpose(' in op_name
  kernel = _kernel_op(name, instrs, comps)
  if kernel is not None:
    op, kline = kernel
    out = _dims(kline.split('=', 1)[1].split(' ', 2)[1])
    window = re.search(r'window=\{size=(\d+)x', kline)
    # Kernel gradients have a kernel's shape ([k, k, C, D] or XLA's
    # [C, k, k, D]) and sometimes no metadata at all; forward convs always
    # carry their op_name.
    if op == 'dot':
      k, grad = 1, len(out) == 2
    else:
      k = int(window.group(1)) if window else 1
      filt = [d for d in (3, 5, 7) if out[1:3] == [d, d] or out[:2] == [d, d]]
      grad = bool(filt) and (back or not op_name)
      k = filt[0] if grad else k
    where = 'head ' if '/head/' in op_name else ''
    what = ('filter-grad' if grad else 'input-grad' if back else 'forward')
    shape = 'kxk im2col' if '/im2col/' in op_name else f'{k}x{k}'
    return f'{where}conv {shape} {what}'
  if re.search(r'/norm[\w]*/', op_name) or '/bn/' in op_name:
    return 'batch norm' + (' backward' if back else '')
  if 'silu' in op_name or 'swish' in op_name:
    return 'activation' + (' backward' if back else '')
  if '/resample' in op_name or 'reduce_window' in op_name:
    return 'resampling (other than convs)'
  if '/head/' in op_name:
    return 'head (other)'
  if 'RetinaNet' in op_name or 'backbone' in op_name:
    return 'model (other)'
  if 'jvp(' in op_name or back:
    return 'loss and targets'
  return 'optimizer and state'


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--case', default='train256')
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--config', default=None,
                 help='A training config file (e.g. configs/demo.py): '
                      'profile its train step instead of --case.')
  args = p.parse_args()
  from spinenet_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.run_under_tcmalloc()  # As train.py does: may restart us.
  host_memory.keep_freed_memory()  # Under glibc, as train.py does.
  if args.config:
    from spinenet_jax import draw  # pylint: disable=g-import-not-at-top
    config = draw.load_config(args.config)
    args.case = os.path.basename(args.config)
    fn, call_args, advance = vs_model_garden.config_program('train', config)
  else:
    fn, call_args, advance = vs_model_garden.ours_program(args.case)
  compiled = fn.lower(*call_args).compile()
  instrs, comps = _parse(compiled.as_text())
  for _ in range(2):  # warm up
    out = compiled(*call_args)
    jax.block_until_ready(out)
    call_args = advance(out, call_args)
  trace = tempfile.mkdtemp(prefix='profile_step_')
  t = time.perf_counter()
  with jax.profiler.trace(trace):
    for _ in range(args.iters):
      out = compiled(*call_args)
      jax.block_until_ready(out)
      call_args = advance(out, call_args)
  wall = (time.perf_counter() - t) / args.iters
  data = jax.profiler.ProfileData.from_file(
      glob.glob(f'{trace}/**/*.xplane.pb', recursive=True)[-1])
  busy = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get('hlo_op')
        if op:
          busy[category(op, instrs, comps)] += event.duration_ns / 1e6
  total = sum(busy.values())
  print(f'{args.case}: {wall * 1e3:.0f} ms per call (wall, while tracing); '
        f'{total / args.iters:.0f} ms of op time per call over all threads; '
        f'load average {os.getloadavg()[0]:.2f}')
  print('| category | ms per call | share |')
  print('|---|---|---|')
  for cat, ms in busy.most_common():
    print(f'| {cat} | {ms / args.iters:.1f} | {100 * ms / total:.1f}% |')


if __name__ == '__main__':
  main()
