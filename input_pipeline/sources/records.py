"""What every source module yields: the user's records before checking."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable


@dataclasses.dataclass
class Record:
  """One image of the user's data, as the user's files describe it.

  `boxes` are pixels (xmin, ymin, xmax, ymax) of the image as its source
  defines them; `categories` the user's category ids; `label` the class
  name (classification). `read()` returns the encoded bytes, or None when
  the file is missing.
  """
  image_id: int
  name: str
  read: Callable[[], bytes | None]
  boxes: list[list[float]] = dataclasses.field(default_factory=list)
  categories: list[int] = dataclasses.field(default_factory=list)
  is_crowd: list[bool] = dataclasses.field(default_factory=list)
  label: str | None = None
  apply_exif: bool = True  # False: pixels as TensorFlow decodes them.


def file_reader(path: str) -> Callable[[], bytes | None]:
  """`read()` of an image file: its bytes, or None when it does not exist."""
  def read():
    try:
      with open(path, 'rb') as f:
        return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      return None
  return read


def require(path: str | None, field: str, what: str) -> str:
  """`path`, checked to exist; a clear error naming the config field."""
  if not path:
    raise ValueError(f'Set config.data.{field} to {what}.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.data.{field}={path!r} does not exist '
                            f'({what}).')
  return os.path.abspath(path)
