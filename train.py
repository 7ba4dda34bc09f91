"""Train SpineNet RetinaNet or a SpineNet classifier.

  python train.py --config=configs/demo.py --workdir=runs/demo \
      [--config.batch_size=64 ...]

Multi-host: on a TPU pod or a cluster JAX detects, processes find each other
by themselves; elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I to every process.
"""

import os

from spinenet_jax import host_memory  # Imports neither JAX nor TensorFlow.

if __name__ == '__main__':  # Before anything else: this may restart us.
  host_memory.run_under_tcmalloc()

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spinenet_jax import distributed  # noqa: E402  # Starts no backend.

FLAGS = flags.FLAGS
CACHE_MAX_BYTES = 4 << 30  # Least recently used entries go beyond this.
config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.DEFINE_integer('heartbeat_timeout_s', 30,
                     'Multi-process: a process silent this long counts as '
                     'dead, and the others stop.')
flags.DEFINE_string(
    'compilation_cache_dir',
    os.path.join(os.path.expanduser('~'), '.cache', 'spinenet_jax', 'xla'),
    'Persistent XLA compilation cache: a rerun or resume with the same '
    'model, shapes and devices skips compiling. Empty: off. The '
    'JAX_COMPILATION_CACHE_DIR environment variable wins.')
flags.DEFINE_bool(
    'keep_freed_memory', True,
    'Linux (glibc): keep the host memory XLA frees for the next step instead '
    'of having the kernel map and zero it again at every step '
    '(spinenet_jax/host_memory.py). The process holds its peak heap. Has no '
    'effect under tcmalloc (SPINENET_JAX_MALLOC, same file).')
flags.DEFINE_integer('num_cpu_devices', None,
                     'Simulate this many CPU devices (testing).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Joins the other processes when there are any."""
  explicit = FLAGS.coordinator_address or FLAGS.num_processes
  if explicit or any(k in os.environ for k in (
      'TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE')):
    # No arguments: an auto-detected cluster.
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, workdir=FLAGS.workdir,
                           heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before the backend starts: its threads must share glibc's main arena.
  kept = FLAGS.keep_freed_memory and host_memory.keep_freed_memory()
  if FLAGS.num_cpu_devices:
    jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  initialize_distributed()
  if jax.process_index() == 0:
    print(host_memory.describe(kept), flush=True)
  if FLAGS.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    if jax.config.jax_compilation_cache_max_size < 0:  # Unbounded by default.
      jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  logging.set_verbosity(logging.WARNING)
  # After distributed initialisation.
  from spinenet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from spinenet_jax import config_checks  # pylint: disable=g-import-not-at-top
  from spinenet_jax import train_lib  # pylint: disable=g-import-not-at-top
  from spinenet_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  try:
    result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_checks.ConfigError, checkpoints.CheckpointError,
          workdir_lock.WorkdirLockedError,
          train_lib.NonFiniteLossError) as e:  # Each says what to do.
    distributed.exit_with(str(e))
  except jax.errors.JaxRuntimeError:  # A collective failed: a dead peer?
    distributed.await_lost_peer()
    raise
  if jax.process_index() == 0:
    print({k: round(v, 4) if isinstance(v, float) else v
           for k, v in result.items()})
  distributed.shutdown()


if __name__ == '__main__':
  app.run(main)
