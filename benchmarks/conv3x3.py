"""kxk convolutions on XLA:CPU: `conv_general_dilated` vs an im2col matmul.

  python benchmarks/conv3x3.py [--grad]

For SpineNet's convolution shapes (batch 2 at 256 px training, batch 1 at
640 px inference; large maps and the head's small ones), prints the median
time of each lowering in `spinenet_jax.conv_impl` (forward, or forward + both
gradients with `--grad`), its GMAC/s, and what 'auto' picks.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from spinenet_jax import conv_impl

SHAPES = [  # (batch, height, in channels, out channels, kernel, stride)
    (2, 64, 64, 64, 3, 1),      # L2 bottleneck
    (2, 32, 128, 128, 3, 1),    # L3 bottleneck
    (2, 16, 256, 256, 3, 1),    # L4 bottleneck
    (2, 32, 256, 256, 3, 1),    # head, L3 at 256 px
    (2, 32, 256, 819, 3, 1),    # class predictor, L3 at 256 px
    (2, 64, 64, 64, 3, 2),      # resampling down
    (2, 256, 3, 64, 7, 2),      # stem
    (1, 80, 256, 256, 3, 1),    # head, L3 at 640 px
    (1, 160, 64, 64, 3, 1),     # L2 bottleneck at 640 px
    (2, 16, 256, 256, 3, 1),    # head, L4 at 256 px
    (2, 8, 256, 819, 3, 1),     # class predictor, L5 at 256 px
    (2, 4, 256, 256, 3, 1),     # head, L6 at 256 px
    (2, 2, 256, 819, 3, 1),     # class predictor, L7 at 256 px
    (1, 20, 256, 256, 3, 1),    # head, L5 at 640 px
    (1, 5, 256, 819, 3, 1),     # class predictor, L7 at 640 px
    (16, 2, 64, 64, 3, 1),      # the demo's head, L7
    (16, 8, 64, 64, 3, 1),      # the demo's head, L5
    (16, 8, 128, 128, 3, 1),
]


def bench(fn, *args, iters=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--grad', action='store_true',
                 help='Forward plus the input and kernel gradients.')
  p.add_argument('--impls', default=','.join(conv_impl.IMPLS))
  args = p.parse_args()
  impls = args.impls.split(',')
  print(f'backend: {jax.default_backend()}, '
        f'{"forward + gradients" if args.grad else "forward"}')
  for b, hw, cin, cout, k, s in SHAPES:
    x = jax.random.normal(jax.random.key(0), (b, hw, hw, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    ho = -(-hw // s)
    gmac = b * ho * ho * k * k * cin * cout / 1e9 * (3 if args.grad else 1)
    row = []
    for impl in impls:
      f = lambda x, w, impl=impl: conv_impl.conv(x, w, s, impl)
      if args.grad:
        f = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
      t = bench(jax.jit(f), x, w)
      row.append(f'{impl} {t * 1e3:7.2f} ms ({gmac / t:5.1f} GMAC/s)')
    auto = conv_impl.resolve('auto', x.shape, k)
    print(f'[{b},{hw},{hw},{cin}] {k}x{k}/{s} -> {cout}: ' + ', '.join(row)
          + f'; auto: {auto}')


if __name__ == '__main__':
  main()
