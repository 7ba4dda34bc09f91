"""SpineNet RetinaNet speed: inference forward pass and a training step.

  python benchmarks/model_speed.py                       # float32, CPU defaults
  python benchmarks/model_speed.py --dtype=bfloat16 --infer_batch=64 \
      --train_size=640 --train_batch=64 --peak_tflops=989  # a GPU

Prints median seconds after compilation. The training step is forward +
backward + an SGD-with-momentum update, with the sum of squares of the raw
outputs as the loss (the set-up used for the Model Garden comparison).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import spinenet_jax as snj
from spinenet_jax import models
from spinenet_jax import summary


def timeit(fn, *args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
    args = (out[0], *args[1:]) if isinstance(out, tuple) else args
  return sorted(times)[len(times) // 2]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='49')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--infer_size', type=int, default=640)
  p.add_argument('--infer_batch', type=int, default=1)
  p.add_argument('--train_size', type=int, default=256)
  p.add_argument('--train_batch', type=int, default=2)
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='Chip peak (dense, this dtype) for utilisation.')
  args = p.parse_args()

  model = snj.RetinaNet(model_id=args.model, dtype=models.get_dtype(args.dtype))
  print(f'SpineNet-{args.model} RetinaNet, {args.dtype}, '
        f'{jax.devices()[0].device_kind} ({jax.default_backend()})')

  x = jnp.zeros((args.infer_batch, args.infer_size, args.infer_size, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x[:1])
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  t = timeit(infer, variables, x, iters=args.iters)
  print(f'inference {args.infer_size}x{args.infer_size} batch '
        f'{args.infer_batch}: {t:.3f} s ({args.infer_batch / t:.1f} img/s)')

  tx = optax.sgd(0.01, momentum=0.9)
  state = (variables['params'], variables['batch_stats'],
           tx.init(variables['params']))

  def loss_fn(params, batch_stats, x):
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                               x, train=True, mutable=['batch_stats'])
    return sum(jnp.sum(o.astype(jnp.float32)**2)
               for o in jax.tree.leaves(out)), updates['batch_stats']

  @jax.jit
  def train_step(state, x):
    params, batch_stats, opt_state = state
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), None

  step = lambda s, x: train_step(s, x)
  xt = jax.random.normal(jax.random.key(1),
                         (args.train_batch, args.train_size, args.train_size, 3))
  t = timeit(step, state, xt, iters=args.iters)
  ips = args.train_batch / t
  print(f'train step {args.train_size}x{args.train_size} batch '
        f'{args.train_batch}: {t:.3f} s ({ips:.1f} img/s)')
  if args.peak_tflops:
    macs = summary.summarize(model, args.train_size)['macs']
    frac = macs * 2 * 3 * ips / (args.peak_tflops * 1e12)
    print(f'  {macs / 1e9:.1f} GMACs/img forward; training reaches '
          f'{100 * frac:.1f}% of {args.peak_tflops} TFLOP/s peak')


if __name__ == '__main__':
  main()
