"""Prepare your own data once, checked and repaired, for training.

  python prepare_data.py --config=configs/finetune.py \
      --config.data.name=coco_json \
      --config.data.train_annotations=DATA/train.json \
      --config.data.train_images=DATA/train \
      --config.data.eval_annotations=DATA/val.json \
      --config.data.eval_images=DATA/val

Takes the same --config and --config.data.* flags as train.py, writes the
dataset under config.data.data_dir (default ~/tensorflow_datasets) and
prints the data check's report (README, "Your own data"). Running it again
is a no-op; an interrupted run starts again from the beginning. Training
with one process prepares the data on first use by itself; run this first
for multi-process (pod) runs.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file.', lock_config=True)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines: the bar is enough.
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top
  from input_pipeline.sources import prepare  # pylint: disable=g-import-not-at-top
  data = _CONFIG.value.data
  if not sources.is_source(data.name):
    sys.exit(f'config.data.name={data.name!r} is not a user-data format; '
             f'use one of {sorted(sources.FORMATS)}.')
  try:
    prepare.prepare(data)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(str(e))
  return 0


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.mark_flags_as_required(['config'])
  app.run(main)
