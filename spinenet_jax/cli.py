"""Flag parsing shared by the command-line tools (`draw`, `predict`)."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags


def parse_flags(prog: str, doc: str,
                define_flags: Callable[[flags.FlagValues], None],
                argv: Sequence[str] | None) -> flags.FlagValues | int:
  """Fresh flags for one call of a tool's `main(argv)`.

  `argv` excludes the program (default: `sys.argv[1:]`). Returns the parsed
  flags, or the exit status to return: 0 after printing help, 2 after
  printing a bad or missing flag's error with the help.
  """
  fv = flags.FlagValues()
  define_flags(fv)
  args = list(sys.argv[1:] if argv is None else argv)
  if {'-h', '--help', '--helpfull'} & set(args):
    print(f'{doc}\n{fv.get_help()}')
    return 0
  try:
    fv([prog, *args])
  except flags.Error as e:
    print(f'{e}\n\n{doc}\n{fv.get_help()}', file=sys.stderr)
    return 2
  return fv
