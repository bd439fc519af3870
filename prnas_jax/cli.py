"""Entry-point plumbing shared by ``search``, ``train``, ``visualize`` and ``report``: flags
parsed with one-line errors for bad overrides and config files, positional arguments counted,
UserErrors reported as one line instead of a traceback, output folders checked, the workdir
claim, joining a multi-process run, and the process's settings: the XLA flags chosen per
backend and malloc keeping freed memory."""
from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from flax import traverse_util

from prnas_jax import checkpoint, data, parallel
from prnas_jax.errors import UserError
from prnas_jax.files import write_json
from prnas_jax.pictures import FORMATS


def _parse_flags(argv):
  path = _config_file(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # a config file may raise anything
    sys.exit(f'error: {_flag_error(e, path, argv)}')


def _flag_error(e: Exception, path: str | None, argv) -> str:
  """The line for an exception of flag parsing: a config file that fails to load, lacks
  ``get_config`` or raises in it; an override of an unknown key; a value of the wrong type."""
  text = e.msg if isinstance(e, SyntaxError) else str(e)
  if path and (line := _line_in(e, path)):
    return (f'config file {path!r} fails at line {line} ({type(e).__name__}'
            f'{": " + text.splitlines()[0] if text else ""}): fix the file')
  if "has no attribute 'get_config'" in text:
    return (f'config file {path!r} has no get_config(): define get_config() that returns the '
            'config, as configs/tiny.py does')
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of an unknown key
    bad = re.search(r'instead of "(\w+)"', text) or re.search(r'(\w+)', text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    where = [a for a in argv if bad and f'.{bad.group(1)}=' in a]
    return (f'unknown config key {bad.group(1) if bad else text!r}'
            f'{" in " + where[0] if where else ""}: '
            f'{"did you mean " + hint.group(1) + "?" if hint else "check the config file"}')
  if isinstance(e, flags.IllegalFlagValueError):
    return _bad_value(text)
  if isinstance(e, flags.Error):
    return text
  raise e


def _line_in(e: Exception, path: str) -> int | None:
  """The line of the config file ``path`` where ``e`` was raised (the innermost), or None."""
  if isinstance(e, SyntaxError) and e.filename and os.path.samefile(e.filename, path):
    return e.lineno
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if os.path.exists(f.filename) and os.path.samefile(f.filename, path)]
  return lines[-1] if lines else None


def _config_file(argv) -> str | None:
  """The file ``--config`` names; exits with one line if there is none (ml_collections would
  defer the failure to the first use of the config, as a traceback)."""
  for flag, value in zip(argv, argv[1:] + ['']):
    if flag.startswith('--config='):
      value = flag.split('=', 1)[1]
    elif flag != '--config':
      continue
    path = value.split(':')[0]  # 'file.py:arg' passes arg to get_config
    if not os.path.isfile(path):
      sys.exit(f'error: config file {path!r} does not exist: pass a config file, e.g. '
               '--config configs/tiny.py')
    return path
  return None


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


# The XLA flags an entry point sets, each with the jaxlib releases it was measured with (XLA
# aborts on a flag it does not know): docs/design.md, "XLA flags".
XLA_FLAGS = (
    # XLA:CPU: its older loop emitter compiles the many small fused loops of a stage faster.
    ('--xla_cpu_use_fusion_emitters=false', ('0.10.',)),
    # XLA:GPU of jax 0.11.2 aborts compiling every search and retraining program in its Triton
    # GEMM tiling (triton_tiling_propagation.cc:703); without it the dots go to cuBLAS.
    ('--xla_gpu_enable_triton_gemm=false', ('0.10.', '0.11.')),
)


def set_xla_flags(environ=os.environ) -> None:
  """Appends each flag of ``XLA_FLAGS`` that suits the installed jaxlib and that the
  ``XLA_FLAGS`` variable does not name already (a user's choice stays). XLA reads the variable
  when JAX starts its backends, so an entry point calls this first. A flag for one backend's
  compiler leaves the others' programs as they were."""
  jaxlib = importlib.metadata.version('jaxlib')
  given = environ.get('XLA_FLAGS', '')
  new = [flag for flag, releases in XLA_FLAGS
         if jaxlib.startswith(releases) and flag.split('=')[0] not in given]
  if new:
    environ['XLA_FLAGS'] = ' '.join([given, *new]).strip()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep the memory that a program frees for the next one instead of
  handing it back to the kernel: no allocation of its own mapping (``M_MMAP_MAX`` 0), no trim
  of the heap (``M_TRIM_THRESHOLD`` -1). XLA:CPU allocates every buffer of a program run and
  frees it after, and by default each large one came from a fresh mapping: 0.9 million page
  faults and 1.5 s of system time in a 3 s search step (docs/design.md, "Memory on the CPU").
  The process then holds its peak memory until it ends. Returns whether this libc took the
  settings (not on macOS or musl)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def prepare_process() -> None:
  """What a process does before JAX starts its backends: ``set_xla_flags`` and
  ``keep_freed_memory``."""
  set_xla_flags()
  keep_freed_memory()


def run(main, args: tuple[str, ...] = ()) -> None:
  """``absl.app.run(main)`` with one-line errors for bad flags and for ``UserError``, after
  ``prepare_process``.

  ``args`` names the positional arguments (e.g. ``('WORKDIR',)``); ``main`` gets them in order.
  """
  prepare_process()

  def guarded(argv):
    logging.set_verbosity(logging.ERROR)  # orbax: INFO lines per checkpoint; tfds: WARNINGs
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
  if not enabled:
    return
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(data.user_cache_dir() / 'xla'))
  # every program, not only those that took a second to compile: building a supernet compiles
  # dozens of small eager programs, and the piece layouts consist of programs of a few seconds
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def check_folder(path, name: str) -> Path:
  """``path`` (the value of ``name``, e.g. ``--workdir``) as a Path; a one-line UserError if it or
  a folder above it is a file."""
  path = Path(path)
  for p in (path, *path.parents):
    if p.exists() and not p.is_dir():
      where = 'is a file' if p == path else f'lies under the file {p}'
      raise UserError(f'{name} {path} {where}: pass a folder')
  return path


def plain(config) -> dict:
  """``config`` as the JSON object ``config.json`` and the checkpoints record."""
  return json.loads(json.dumps(config.to_dict()))


def check_claim(workdir: Path, config, overwrite: bool) -> None:
  """Refuses ``workdir`` (one line) if it holds a different run, unless ``overwrite``. A checkpoint
  makes a workdir a run (a start that failed before its first one left nothing to keep); the
  config its checkpoints record is the run's, ``config.json`` a copy for reading, used only where
  the checkpoints (written before the config was recorded) lack it."""
  if overwrite:
    return
  held, recorded = checkpoint.recorded_config(workdir / 'checkpoints')
  if not held:
    return
  new, path, source = plain(config), workdir / 'config.json', 'the config its checkpoints record'
  if recorded is None:
    if not path.is_file():
      raise UserError(f'{path} is missing and the checkpoints in {workdir} do not record their '
                      'config: restore config.json, use a new --workdir, or pass --overwrite to '
                      'replace the run')
    try:
      recorded, source = json.loads(path.read_text()), 'its config.json'
    except (OSError, ValueError) as e:
      raise UserError(f'{path} is not valid JSON ({e}) and the checkpoints in {workdir} do not '
                      'record their config: undo the edit, use a new --workdir, or pass '
                      '--overwrite to replace the run') from None
  if recorded != new:
    flat_old = traverse_util.flatten_dict(recorded, sep='.') if isinstance(recorded, dict) else {}
    flat_new = traverse_util.flatten_dict(new, sep='.')
    diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    raise UserError(f'{workdir} holds a different run ({source} differs in '
                    f'{", ".join(diff[:3])}{", ..." if len(diff) > 3 else ""}): use a new '
                    '--workdir, or pass --overwrite to replace it')


def claim_workdir(workdir: Path, config, overwrite: bool, outputs=()) -> None:
  """After ``check_claim`` and every other check: removes the ``outputs`` (names inside
  ``workdir``: checkpoints, logs) of the run it replaces with ``overwrite``, or left by a start
  that never wrote a checkpoint, and records ``config`` in ``workdir/config.json``."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create --workdir {workdir} ({e.strerror or e}): pass a folder you '
                    'can write') from None
  replace = overwrite or not checkpoint.recorded_config(workdir / 'checkpoints')[0]
  parallel.barrier('claim_workdir: every process has looked')
  if replace and parallel.is_main_process():
    for name in outputs:
      target = workdir / name
      if target.is_dir():
        shutil.rmtree(target)
      else:
        target.unlink(missing_ok=True)
  write_json(workdir / 'config.json', plain(config))
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
  join_timeout = flags.DEFINE_integer('join_timeout', 300, 'Seconds to wait for every process '
                                      'of a multi-process run to join.', lower_bound=1)

  def values(need_workdir=lambda config: True):
    if config.value is None:
      raise UserError(f'--config is required: pass a config file, e.g. --config {example}')
    if not isinstance(config.value, ml_collections.ConfigDict):
      raise UserError(f'get_config() of the config file gives {type(config.value).__name__}, '
                      f'not a ConfigDict: return the config, as {example} does')
    if need_workdir(config.value) and not workdir.value:
      raise UserError('--workdir is required: pass --workdir DIR')
    given = (coordinator.value, num_processes.value, process_id.value)
    if distributed.value or any(v is not None for v in given):
      parallel.initialize(*given, timeout=join_timeout.value)
    return config.value, workdir.value, overwrite.value
  return values


def picture_flags(out_help: str, default_out: str | None = None):
  """``--out`` and ``--format`` of the picture entry points (visualize, report)."""
  return (flags.DEFINE_string('out', default_out, out_help),
          flags.DEFINE_enum('format', 'png', FORMATS, 'Picture file format.'))
