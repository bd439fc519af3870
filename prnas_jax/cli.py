"""Entry-point plumbing shared by ``search``, ``visualize`` and ``report``: flags parsed with
one-line errors for bad overrides, positional arguments counted, and UserErrors reported as one
line instead of a traceback."""
from __future__ import annotations

import re
import sys

from absl import app, flags

from prnas_jax.errors import UserError
from prnas_jax.pictures import FORMATS


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
    text = str(e)
    bad = re.search(r'instead of "(\w+)"', text) or re.search(r'(\w+)', text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    where = [a for a in argv if bad and f'.{bad.group(1)}=' in a]
    sys.exit(f'error: unknown config key {bad.group(1) if bad else text!r}'
             f'{" in " + where[0] if where else ""}: '
             f'{"did you mean " + hint.group(1) + "?" if hint else "check the config file"}')
  except flags.Error as e:
    sys.exit(f'error: {e}')


def run(main, args: tuple[str, ...] = ()) -> None:
  """``absl.app.run(main)`` with one-line errors for bad flags and for ``UserError``.

  ``args`` names the positional arguments (e.g. ``('WORKDIR',)``); ``main`` gets them in order.
  """
  def guarded(argv):
    given = argv[1:]
    if len(given) != len(args):
      want = ' '.join(args) or 'no arguments'
      sys.exit(f'error: expected {want}, got {given or "none"}: see --help')
    try:
      main(*given)
    except UserError as e:
      sys.exit(f'error: {e}')
  app.run(guarded, flags_parser=_parse_flags)


def picture_flags(out_help: str, default_out: str | None = None):
  """``--out`` and ``--format`` of the picture entry points (visualize, report)."""
  return (flags.DEFINE_string('out', default_out, out_help),
          flags.DEFINE_enum('format', 'png', FORMATS, 'Picture file format.'))
