"""Command line: `python -m spinenet_jax.convert_model_garden --help`."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags

from spinenet_jax.convert_model_garden.conversion import convert
from spinenet_jax.convert_model_garden.matching import ConversionError

PROG = 'python -m spinenet_jax.convert_model_garden'
USAGE = (f'usage: {PROG} --checkpoint=TF_CKPT_PREFIX --output=DIR '
         '[--model=49] [--task=retinanet] [--num_classes=N] '
         '[--backbone_only] [--image_size=N]')
DESCRIPTION = ('Import TF2 Model Garden SpineNet checkpoints into a '
               'spinenet_jax run directory.')
REQUIRED = ('checkpoint', 'output')
_HELP_ARGS = ('-h', '-help', '--help', '-helpshort', '--helpshort',
              '-helpfull', '--helpfull', '-?')


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the converter's flags in `fv`."""
  flags.DEFINE_string('checkpoint', None,
                      'TF checkpoint prefix, e.g. DIR/ckpt-231000 (required)',
                      flag_values=fv)
  flags.DEFINE_string('model', '49',
                      'model id: 49S, 49, 96, 143, 143L, 190, 49_mobile, '
                      '49S_mobile, 49XS_mobile', flag_values=fv)
  flags.DEFINE_enum('task', 'retinanet', ['retinanet', 'classification'],
                    'what the checkpoint holds', flag_values=fv)
  flags.DEFINE_string('output', None, 'run directory to write (required)',
                      flag_values=fv)
  flags.DEFINE_integer('num_classes', None, 'default: from the checkpoint',
                       flag_values=fv)
  flags.DEFINE_boolean('backbone_only', False,
                       'convert only the backbone; the head starts fresh',
                       flag_values=fv)
  flags.DEFINE_integer('image_size', None,
                       "config.data.image_size (default: the model's)",
                       flag_values=fv)


def _usage_error(message: str) -> int:
  print(f'{USAGE}\nerror: {message} (see --help)', file=sys.stderr)
  return 2


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the converter on `argv` (default: sys.argv[1:]); the exit status.

  0: written; 1: the conversion failed (message on stderr); 2: bad flags.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define_flags(fv)
  flag_args = args[:args.index('--')] if '--' in args else args
  if any(a in _HELP_ARGS for a in flag_args):
    # get_help() heads the flags with the defining module's path.
    table = fv.get_help(include_special_flags=False).strip().split('\n', 1)[1]
    print(f'{USAGE}\n\n{DESCRIPTION}\n\nflags:\n{table}')
    return 0
  try:
    rest = fv(['convert_model_garden', *args])
  except flags.Error as e:
    return _usage_error(str(e))
  if len(rest) > 1:
    return _usage_error(f'unexpected arguments: {" ".join(rest[1:])}')
  missing = [f'--{name}' for name in REQUIRED if fv[name].value is None]
  if missing:
    return _usage_error(f'the following flags are required: '
                        f'{", ".join(missing)}')
  try:
    config, _ = convert(fv.checkpoint, fv.model, fv.task, fv.output,
                        fv.num_classes, fv.backbone_only, fv.image_size)
  except (ConversionError, FileNotFoundError, FileExistsError,
          ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Wrote {fv.output} (SpineNet-{fv.model} {fv.task}, '
        f'{json.dumps(config.model.to_dict())}).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
