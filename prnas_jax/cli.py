"""Entry-point plumbing shared by ``search`` (and later ``train``): flags parsed with one-line
errors for bad overrides, and UserErrors reported as one line instead of a traceback."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from prnas_jax.errors import UserError


def _parse_flags(argv):
  _check_config_files(argv)
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
  except flags.IllegalFlagValueError as e:
    sys.exit(f'error: {_bad_value(str(e))}')
  except flags.Error as e:
    sys.exit(f'error: {e}')


def _check_config_files(argv) -> None:
  """Exits with one line if ``--config`` names no file (ml_collections would defer the failure to
  the first use of the config, as a traceback)."""
  for flag, value in zip(argv, argv[1:] + ['']):
    if flag.startswith('--config='):
      value = flag.split('=', 1)[1]
    elif flag != '--config':
      continue
    path = value.split(':')[0]  # 'file.py:arg' passes arg to get_config
    if not os.path.isfile(path):
      sys.exit(f'error: config file {path!r} does not exist: pass a config file, e.g. '
               '--config configs/tiny.py')


_KINDS = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false', 'tuple': 'a tuple'}


def _bad_value(text: str) -> str:
  """absl's 'flag --NAME=VALUE: reason' as what NAME takes, with the config's value as example."""
  m = re.match(r'flag --([\w.]+)=(.*?): ', text)
  if not (m and m.group(1) in flags.FLAGS):
    return text
  flag = flags.FLAGS[m.group(1)]
  kind = _KINDS.get(flag.parser.flag_type())
  if not kind:
    return text
  value = flag.default
  if isinstance(value, (list, tuple)):
    value = f"'{tuple(value)}'"
  elif isinstance(value, bool):
    value = str(value).lower()
  return f'--{m.group(1)}={m.group(2)} is not {kind}: give {kind}, e.g. --{m.group(1)}={value}'


def run(main) -> None:
  """``absl.app.run(main)`` with one-line errors for bad flags and for ``UserError``."""
  def guarded(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
      main()
    except UserError as e:
      sys.exit(f'error: {e}')
  app.run(guarded, flags_parser=_parse_flags)
