"""Entry-point plumbing shared by ``search``, ``train``, ``visualize`` and ``report``: flags
parsed with one-line errors for bad overrides, positional arguments counted, UserErrors reported
as one line instead of a traceback, the workdir claim, and joining a multi-process run."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from flax import traverse_util

from prnas_jax import data, parallel
from prnas_jax.errors import UserError
from prnas_jax.files import write_json
from prnas_jax.pictures import FORMATS


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


def run(main, args: tuple[str, ...] = ()) -> None:
  """``absl.app.run(main)`` with one-line errors for bad flags and for ``UserError``.

  ``args`` names the positional arguments (e.g. ``('WORKDIR',)``); ``main`` gets them in order.
  """
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs a dozen INFO lines per checkpoint
    given = argv[1:]
    if len(given) != len(args):
      want = ' '.join(args) or 'no arguments'
      sys.exit(f'error: expected {want}, got {given or "none"}: see --help')
    try:
      main(*given)
    except UserError as e:
      sys.exit(f'error: {e}')
  app.run(guarded, flags_parser=_parse_flags)


def use_compile_cache(enabled: bool) -> None:
  """Turns on XLA's persistent compilation cache in ``data.user_cache_dir() / 'xla'`` (or where
  ``JAX_COMPILATION_CACHE_DIR`` says), so that a rerun, a resumed stage or a stage of an equal
  supernet loads its programs instead of compiling them again (the 8-cell ``first`` search step:
  42 s to compile, 14 s from the cache)."""
  if enabled and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(data.user_cache_dir() / 'xla'))


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
  if overwrite and parallel.is_main_process():
    for name in outputs:
      target = workdir / name
      if target.is_dir():
        shutil.rmtree(target)
      else:
        target.unlink(missing_ok=True)
  write_json(path, new)
  parallel.barrier('claim_workdir')


def run_flags(config_help: str, example: str):
  """``--config``, ``--workdir``, ``--overwrite`` and the multi-process flags of the run entry
  points (search, train); returns a function that joins the processes of a multi-process run and
  gives ``(config, workdir, overwrite)``, or raises a one-line UserError."""
  config = config_flags.DEFINE_config_file('config', None, config_help, lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Directory for all outputs of the run.')
  overwrite = flags.DEFINE_bool('overwrite', False, 'Replace a different run in --workdir.')
  distributed = flags.DEFINE_bool(
      'distributed', False, 'Join a multi-process run through jax.distributed; what the three '
      'flags below leave unset is detected on SLURM, Cloud TPU, Kubernetes and Open MPI.')
  coordinator = flags.DEFINE_string('coordinator', None, 'HOST:PORT of process 0 (implies '
                                    '--distributed; default: $JAX_COORDINATOR_ADDRESS).')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Number of processes (implies '
                                       '--distributed).')
  process_id = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1 '
                                    '(implies --distributed).')

  def values(need_workdir=lambda config: True):
    if config.value is None:
      raise UserError(f'--config is required: pass a config file, e.g. --config {example}')
    if need_workdir(config.value) and not workdir.value:
      raise UserError('--workdir is required: pass --workdir DIR')
    given = (coordinator.value, num_processes.value, process_id.value)
    if distributed.value or any(v is not None for v in given):
      parallel.initialize(*given)
    return config.value, workdir.value, overwrite.value
  return values


def picture_flags(out_help: str, default_out: str | None = None):
  """``--out`` and ``--format`` of the picture entry points (visualize, report)."""
  return (flags.DEFINE_string('out', default_out, out_help),
          flags.DEFINE_enum('format', 'png', FORMATS, 'Picture file format.'))
