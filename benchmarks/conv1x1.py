"""1x1 convolution on XLA: conv_general_dilated vs a matmul over channels.

  python benchmarks/conv1x1.py
"""

import time

import jax
import jax.numpy as jnp


def bench(fn, *args, iters=10):
  fn(*args).block_until_ready()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def main():
  print(f'backend: {jax.default_backend()}')
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  dot = jax.jit(lambda x, k: jnp.einsum('bhwc,cd->bhwd', x, k[0, 0]))
  conv3 = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  for b, hw, cin, cout in [(1, 160, 512, 128), (1, 80, 1024, 256),
                           (2, 64, 256, 64), (1, 40, 256, 1024)]:
    x = jax.random.normal(jax.random.key(0), (b, hw, hw, cin))
    k = jax.random.normal(jax.random.key(1), (1, 1, cin, cout))
    t_conv, t_dot = bench(conv, x, k), bench(dot, x, k)
    k3 = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    t_conv3 = bench(conv3, x, k3)
    gmac = b * hw * hw * cin * cout / 1e9
    print(f'[{b},{hw},{hw},{cin}] -> {cout}: 1x1 conv {t_conv * 1e3:7.2f} ms '
          f'({gmac / t_conv:5.1f} GMAC/s), einsum {t_dot * 1e3:7.2f} ms '
          f'({gmac / t_dot:5.1f} GMAC/s), ratio {t_conv / t_dot:4.1f}x; '
          f'3x3 conv {9 * gmac / t_conv3:5.1f} GMAC/s')


if __name__ == '__main__':
  main()
