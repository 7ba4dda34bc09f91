"""Shared pieces of the input pipelines: datasets, per-process splits,
deterministic streams, decoding, NumPy iteration and the train / eval
iterators that the task modules fill with their preprocessing
(`build_train_iterator`, `build_eval_iterator`).

Determinism of the training stream (what `start_step` relies on): process
`p` of `n` reads `tfds.even_splits(split, n)[p]`, a fixed slice of `m`
examples. Its stream is the concatenation of epochs 0, 1, 2, ...; epoch `e`
is that slice read in a fixed file order and passed through a shuffle buffer
whose seed is a function of (seed, p, e). Example `k` of the stream (epoch
`k // m`, position `k % m`) is augmented with stateless random ops keyed on
(seed, p, k). Batch `j` holds examples `j*b .. j*b+b-1`. Starting at step
`K` therefore starts at epoch `K*b // m` and skips `K*b % m` examples, which
are only read as encoded records (never decoded), so a resume costs at most
one epoch of record reads. Bad images (`sanitize`: undecodable, empty, too
large) are dropped after the index is assigned: they shift later batches by
one example but never change which example gets which augmentation.
"""
from __future__ import annotations

from collections.abc import Callable
import logging
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import contract
from input_pipeline import sanitize
from input_pipeline import shapes
from input_pipeline import sources

# Keep TensorFlow off accelerators: JAX owns them.
try:
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except (RuntimeError, ValueError):  # Already initialised or no such device.
  pass

INDEX_KEY = '_index'  # Internal: position of an example in its stream.

Features = dict[str, tf.Tensor]
# (example, RNG key or index in the split) -> fixed-shape features.
Preprocess = Callable[[Features, tf.Tensor], Features]


def _is_shapes(name: str) -> bool:
  return name == 'shapes' or name.startswith('shapes/')


def _shapes_config(data_cfg: ml_collections.ConfigDict) -> shapes.ShapesConfig:
  task = data_cfg.name.partition('/')[2] or 'detection'
  return shapes.make_config(
      task, num_train=data_cfg.num_train_examples,
      num_validation=data_cfg.num_eval_examples,
      image_size=data_cfg.shapes_image_size)


def _where(data_cfg: ml_collections.ConfigDict) -> str:
  return data_cfg.data_dir or tfds.core.constants.DATA_DIR


_SHAPES_BUILDERS = {}  # (config name, data_dir) -> prepared builder.


def get_builder(data_cfg: ml_collections.ConfigDict
                ) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by `data_cfg.name`; builds shapes/* on first use.

  Raises:
    ValueError: if no TFDS dataset has that name.
  """
  name, data_dir = data_cfg.name, data_cfg.data_dir
  if _is_shapes(name):
    config = _shapes_config(data_cfg)
    cache_key = (config.name, data_dir)
    if cache_key not in _SHAPES_BUILDERS:
      builder = shapes.Shapes(config=config, data_dir=data_dir)
      if not builder.is_prepared():
        logging.info('Building %s (first use).', builder.data_dir)
        builder.download_and_prepare()
      _SHAPES_BUILDERS[cache_key] = builder
    return _SHAPES_BUILDERS[cache_key]
  if sources.is_source(name):
    from input_pipeline.sources import prepare  # pylint: disable=g-import-not-at-top
    return prepare.get(data_cfg)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {name!r} (config.data.name): no TFDS builder of '
        f'that name is registered and no prepared copy was found in '
        f'data_dir {_where(data_cfg)!r}. Built in: shapes/detection, '
        f'shapes/classification.') from e


def _not_prepared(builder: tfds.core.DatasetBuilder) -> FileNotFoundError:
  return FileNotFoundError(
      f'Dataset {builder.info.full_name!r} is not prepared: nothing found '
      f'in {builder.data_dir!r} (data_dir {builder.data_dir_root!r}, set by '
      f'config.data.data_dir). Prepare it first, e.g. `tfds build '
      f'{builder.info.full_name.rsplit("/", 1)[0]} '
      f'--data_dir={builder.data_dir_root}` (some datasets need a manual '
      f'download), or point config.data.data_dir at a prepared copy.')


def as_dataset(builder: tfds.core.DatasetBuilder, split: Any, *,
               shuffle_files: bool, seed: int | None = None
               ) -> tf.data.Dataset:
  """Examples of `split` with the image left encoded; clear error if absent."""
  read_config = tfds.ReadConfig(shuffle_seed=seed,
                                shuffle_reshuffle_each_iteration=False)
  try:
    return builder.as_dataset(
        split=split, shuffle_files=shuffle_files, read_config=read_config,
        decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError as e:  # TFDS: "could not find data in ...".
    raise _not_prepared(builder) from e


def resolve_process(process_index: int | None, process_count: int | None
                    ) -> tuple[int, int]:
  """Process index and count; defaults from JAX."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def local_batch_size(batch_size: int, process_count: int) -> int:
  """Per-process batch size; the global batch must divide evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'Global batch size {batch_size} must be a positive '
                     f'multiple of the process count {process_count}.')
  return batch_size // process_count


def process_splits(split: str, process_count: int) -> list[Any]:
  """The per-process subsplits of `split` (disjoint, covering, in order)."""
  return tfds.even_splits(split, n=process_count)


def split_size(builder: tfds.core.DatasetBuilder, split: Any) -> int:
  """Number of examples in a (sub)split, from the dataset's metadata."""
  if not builder.info.splits:
    raise _not_prepared(builder)
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError as e:
    raise ValueError(
        f'Split {split!r} of {builder.info.full_name!r} is unknown; '
        f'available: {sorted(builder.info.splits)}.') from e


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in `split` of the dataset named by `data_cfg`."""
  return split_size(get_builder(data_cfg), split)


def example_key(seed: int, process_index: int, index: tf.Tensor) -> tf.Tensor:
  """Stateless RNG key ([2] int64) of stream example `index`."""
  key = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, index)


def train_examples(builder: tfds.core.DatasetBuilder, split: str, *, seed: int,
                   start_index: int, process_index: int, process_count: int,
                   shuffle_buffer: int) -> tf.data.Dataset:
  """Endless `(index, example)` stream of this process, from `start_index`.

  See the module docstring for the order and how a start is skipped to.
  """
  sub = process_splits(split, process_count)[process_index]
  # Ordered datasets (e.g. shapes) must be read in order; the buffer shuffles.
  base = as_dataset(builder, sub, seed=seed,
                    shuffle_files=not builder.info.disable_shuffling)
  start_epoch, offset = 0, 0
  if start_index:
    size = split_size(builder, sub)
    if size == 0:
      raise ValueError(f'Split {split!r} has no examples for process '
                       f'{process_index} of {process_count}.')
    start_epoch, offset = divmod(start_index, size)

  def epoch(e):
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, process_index], tf.int64), e)
    shuffle_seed = tf.random.stateless_uniform([], key, minval=None,
                                               maxval=None, dtype=tf.int64)
    return base.shuffle(shuffle_buffer, seed=shuffle_seed)

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
  return ds.skip(offset).enumerate(start=start_index)


def eval_examples(builder: tfds.core.DatasetBuilder, split: str, *,
                  process_index: int, process_count: int
                  ) -> tuple[tf.data.Dataset, int, int, int]:
  """One pass `(index, example)` over this process's slice of `split`.

  Returns:
    The dataset, the index of its first example in `split`, its size, and
    the largest slice size over all processes (every process pads to it).
  """
  subs = process_splits(split, process_count)
  sizes = [split_size(builder, s) for s in subs]
  ds = as_dataset(builder, subs[process_index], shuffle_files=False)
  return (ds.enumerate(), sum(sizes[:process_index]), sizes[process_index],
          max(sizes))


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def scale_and_crop(image: tf.Tensor, size: tf.Tensor, scale: tf.Tensor,
                   offset: tf.Tensor | None = None) -> tf.Tensor:
  """Bilinear resize by `scale` ([2], y and x), then a crop at `offset`.

  Equal to `tf.image.resize(image, round(hw * scale))[oy:oy+h, ox:ox+w]`
  (half-pixel centres, no antialiasing) with `size` = (h, w), but computes
  only the output pixels and keeps the scale exact. Returns float32.
  """
  offset = tf.zeros([2]) if offset is None else offset
  return tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=tf.cast(size, tf.int32),
      scale=tf.cast(scale, tf.float32),
      translation=-tf.cast(offset, tf.float32), kernel_type='triangle',
      antialias=False)[0]


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] RGB -> float32 normalised with the ImageNet mean and std."""
  image = tf.cast(image, tf.float32) / 255.0
  return ((image - tf.constant(contract.MEAN_RGB)) /
          tf.constant(contract.STDDEV_RGB))


def finish(ds: tf.data.Dataset, preprocess: Callable[..., Features],
           data_cfg: ml_collections.ConfigDict, batch: int, *,
           pad: Features | None = None, num_batches: int | None = None
           ) -> tf.data.Dataset:
  """Preprocess `(index, example)`, skip bad ones (`sanitize`), pad, batch."""
  # num_parallel_calls -1 is tf.data.AUTOTUNE; the order stays deterministic.
  ds = ds.map(lambda i, ex: {**sanitize.no_problems(), **preprocess(i, ex),
                             INDEX_KEY: i},
              num_parallel_calls=data_cfg.num_parallel_calls)
  ds = ds.ignore_errors(log_warning=True)
  if pad is not None:
    pad = {**sanitize.no_problems(), **pad,
           INDEX_KEY: tf.constant(-1, tf.int64)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = sanitize.drop_skipped(ds)  # After the padding: it carries the last.
  if pad is not None:
    ds = ds.take(num_batches * batch)
  ds = ds.batch(batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options).prefetch(data_cfg.prefetch)


class NumpyIterator:
  """Iterates NumPy batches; counts skipped examples and data problems.

  `num_skipped`: examples skipped (bad images), from gaps in the stream
  index (one pass, given `total`: trailing ones too). `data_problems()`:
  counts per kind so far (`sanitize`), logged when they change.
  """

  def __init__(self, ds: tf.data.Dataset, name: str, first_index: int = 0,
               total: int | None = None):
    self._it = ds.as_numpy_iterator()
    self._next_index = first_index
    self._total = total
    self._tally = sanitize.Tally(name)
    self.num_skipped = 0

  def __iter__(self) -> NumpyIterator:
    return self

  @property
  def position(self) -> int:
    """Stream index after the last example yielded or skipped."""
    return self._next_index

  def data_problems(self) -> dict[str, int]:
    """Counts per kind (`sanitize.KINDS`) of what this iterator met."""
    return self._tally.counts()

  def _skip(self, skipped: int, next_index: int) -> None:
    self.num_skipped += skipped
    self._next_index = next_index
    self._tally.set_skipped(self.num_skipped)

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      if self._total is not None:
        self._skip(self._total - self._next_index, self._total)
      self._tally.log(force=True)
      raise
    index = batch.pop(INDEX_KEY)
    self._tally.add(batch.pop(sanitize.PROBLEMS_KEY))
    del batch[sanitize.KEEP_KEY]
    real = index[index >= 0]
    if real.size:
      last = int(real[-1]) + 1
      self._skip(last - self._next_index - real.size, last)
    if real.size < index.size and self._total is not None:  # Padding.
      self._skip(self._total - self._next_index, self._total)
    self._tally.log()
    return batch


def pad_instances(tensor: tf.Tensor, size: int, value: float | int
                  ) -> tf.Tensor:
  """Truncates or pads dim 0 of `tensor` to `size` with `value`."""
  tensor = tensor[:size]
  pad = size - tf.shape(tensor)[0]
  paddings = [[0, pad]] + [[0, 0]] * (len(tensor.shape) - 1)
  out = tf.pad(tensor, paddings, constant_values=tf.cast(value, tensor.dtype))
  out.set_shape([size] + tensor.shape[1:].as_list())
  return out


def build_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    make_preprocess: Callable[[tfds.core.DatasetBuilder], Preprocess], *,
    batch_size: int, seed: int, start_step: int, process_index: int | None,
    process_count: int | None, with_ids: bool) -> NumpyIterator:
  """The training iterator of a task, given its preprocessing.

  Args:
    data_cfg: `config.data`.
    make_preprocess: builder -> `preprocess(example, key)`, the task's
      augmentation of one example with its stateless RNG key (see
      `example_key`); may raise if the dataset does not fit the task.
    batch_size: global batch size.
    seed: seed of the stream.
    start_step: first step to yield (see the module docstring).
    process_index: this process; None: from JAX.
    process_count: number of processes; None: from JAX.
    with_ids: also yield `image_id` int64 [b] (`image/id`, -1 if absent).

  Returns:
    Endless batches of this process, b = batch_size // process_count.
  """
  pi, pc = resolve_process(process_index, process_count)
  b = local_batch_size(batch_size, pc)
  builder = get_builder(data_cfg)
  preprocess = make_preprocess(builder)

  def fn(index, ex):
    out = preprocess(ex, example_key(seed, pi, index))
    if with_ids:
      out['image_id'] = tf.cast(ex.get('image/id', -1), tf.int64)
    return out

  ds = train_examples(
      builder, data_cfg.train_split, seed=seed, start_index=start_step * b,
      process_index=pi, process_count=pc,
      shuffle_buffer=data_cfg.shuffle_buffer)
  ds = finish(ds, fn, data_cfg, b)
  return NumpyIterator(ds, f'{data_cfg.name} train',
                       first_index=start_step * b)


def build_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    make_preprocess: Callable[[tfds.core.DatasetBuilder], Preprocess],
    padding: Features, *, batch_size: int, process_index: int | None,
    process_count: int | None) -> NumpyIterator:
  """The evaluation iterator of a task, given its preprocessing.

  One pass over this process's slice of `data_cfg.eval_split`, then
  `padding` examples up to the batch count of the largest slice, so that
  every process yields the same number of batches.

  Args:
    data_cfg: `config.data`.
    make_preprocess: builder -> `preprocess(example, index)`, the task's
      preprocessing of one example with its position in the split.
    padding: a padding example (the features of `preprocess`'s output).
    batch_size: global batch size.
    process_index: this process; None: from JAX.
    process_count: number of processes; None: from JAX.
  """
  pi, pc = resolve_process(process_index, process_count)
  b = local_batch_size(batch_size, pc)
  builder = get_builder(data_cfg)
  preprocess = make_preprocess(builder)
  ds, first, size, largest = eval_examples(
      builder, data_cfg.eval_split, process_index=pi, process_count=pc)
  ds = finish(ds, lambda i, ex: preprocess(ex, i + first), data_cfg, b,
              pad=padding, num_batches=-(-largest // b))
  return NumpyIterator(ds, f'{data_cfg.name} eval', total=size)
