"""Entry-point plumbing shared by ``search`` and ``train``: flags parsed with one-line errors for
bad overrides, UserErrors reported as one line instead of a traceback, and the workdir claim."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from absl import app, flags
from flax import traverse_util

from prnas_jax.errors import UserError
from prnas_jax.files import write_json


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


def claim_workdir(workdir: Path, config, overwrite: bool, outputs=()) -> None:
  """Records ``config`` in ``workdir/config.json``. A workdir holding the same config is a run to
  resume; one holding a different config is refused, unless ``overwrite``, which first removes
  the old run's ``outputs`` (names inside ``workdir``: checkpoints, logs)."""
  path = workdir / 'config.json'
  new = json.loads(json.dumps(config.to_dict()))
  try:
    old = json.loads(path.read_text()) if path.exists() else new
  except (OSError, ValueError):
    old = None
  if old != new and not overwrite:
    flat_old = traverse_util.flatten_dict(old, sep='.') if isinstance(old, dict) else {}
    flat_new = traverse_util.flatten_dict(new, sep='.')
    diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    raise UserError(f'{workdir} holds a different run (config differs in {", ".join(diff[:3])}'
                    f'{", ..." if len(diff) > 3 else ""}): use a new --workdir, or pass '
                    '--overwrite to replace it')
  if overwrite:
    for name in outputs:
      target = workdir / name
      if target.is_dir():
        shutil.rmtree(target)
      else:
        target.unlink(missing_ok=True)
  write_json(path, new)
