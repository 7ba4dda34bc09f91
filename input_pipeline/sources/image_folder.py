"""Classification from image folders: `<root>/<class name>/<image>`.

`config.data.train_images` / `eval_images`: the roots. Class names are the
sub-folder names of both roots, sorted (TFDS label = position); image ids
are positions in the sorted file list (from 1), with the relative paths
kept beside them. Files of any image format PIL reads are taken; others
are reported as unreadable.
"""
from __future__ import annotations

import os
from typing import Iterator

from input_pipeline.sources import checks
from input_pipeline.sources import records

Record = records.Record


def class_names(roots: list[str]) -> list[str]:
  return sorted({d for root in roots for d in os.listdir(root)
                 if os.path.isdir(os.path.join(root, d))})


def read(root: str, split: str, report: checks.Report) -> Iterator[Record]:
  """The images under `root`, sorted by class and file name."""
  del report  # Every file is a record; check_image reports bad ones.
  paths = sorted(
      (c, f) for c in os.listdir(root) if os.path.isdir(os.path.join(root, c))
      for f in os.listdir(os.path.join(root, c))
      if not f.startswith('.') and os.path.isfile(os.path.join(root, c, f)))
  for index, (label, name) in enumerate(paths):
    yield Record(image_id=index + 1, name=f'{label}/{name}',
                 read=records.file_reader(os.path.join(root, label, name)),
                 label=label)
