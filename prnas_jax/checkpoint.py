"""Checkpoints of a run through orbax: a pytree of arrays plus a JSON record, under
``WORKDIR/checkpoints/<step>``.

The arrays are written packed, one flat array per dtype, with a table of every leaf's path,
shape and dtype beside them: orbax spends about 2 ms per array, and a search's state has
thousands of small ones (2,365 at 5 cells: 4-5 s a save, 0.1 s packed).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed while saving leaves the previous checkpoint as the latest readable one; leftover
temporary directories are removed on the next start. A checkpoint damaged later (a truncated or
missing file) is skipped with one warning line: a run resumes from the newest intact one. Nothing
is unpickled: arrays are read as arrays into the caller's template, the record as JSON.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from prnas_jax.errors import UserError

log = logging.getLogger('prnas_jax')
# what orbax and tensorstore raise for a damaged checkpoint (JSONDecodeError is a ValueError),
# and what a record of the wrong shape raises in the caller's template
DAMAGE = (OSError, ValueError, KeyError, TypeError)


class Checkpoints:
  """The checkpoints of one run; at most ``keep`` are kept (the newest), all if None. ``config``
  (JSON-able) is recorded in each: it is what makes the workdir that run (``recorded_config``)."""

  def __init__(self, directory, keep: int | None, config: dict | None = None):
    self.directory = Path(directory).absolute()
    self.config = config
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def save(self, step: int, state, record: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``record`` (JSON-able) as checkpoint ``step``."""
    try:
      if self.config is not None:
        record = record | {'config': self.config}
      packed, table = _pack(state)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(packed), table=ocp.args.JsonSave(table),
          record=ocp.args.JsonSave(record)), force=True)
      self._manager.wait_until_finished()
    except OSError as e:
      raise UserError(f'could not write checkpoint {step} to {self.directory} ({e.strerror or e}):'
                      ' free disk space and rerun the same command to resume from the last '
                      'complete checkpoint') from e

  def record(self, step: int) -> dict:
    """The record of checkpoint ``step`` alone (it may describe the template of its state)."""
    return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))[
        'record']

  def restore(self, step: int, template=None):
    """``(state, record)`` of checkpoint ``step``; ``state`` as host arrays in the structure of
    ``template`` (arrays or ``jax.ShapeDtypeStruct``, a ValueError unless its leaves' paths,
    shapes and dtypes are the saved ones), or without one as a dict from each leaf's path
    (``jax.tree_util.keystr``) to its array. The caller places them (``parallel.replicate``),
    exactly as a fresh state is placed, so a resumed step compiles to the uninterrupted run's
    program."""
    table = self._manager.restore(step, args=ocp.args.Composite(table=ocp.args.JsonRestore()))[
        'table']
    sizes = {}
    for _, shape, dtype in table:
      sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({k: jax.ShapeDtypeStruct((n,), k) for k, n in
                                        sizes.items()}),
        record=ocp.args.JsonRestore()))
    return _unpack(jax.tree.map(np.asarray, out['state']), table, template), out['record']

  def newest_record(self) -> dict | None:
    """The newest readable record, or None without checkpoints; a one-line UserError if none is
    readable."""
    _quiet_closed_loop()
    damaged = []
    for step in self.steps():
      try:
        return self.record(step)
      except DAMAGE as e:
        damaged.append((step, _reason(e)))
    self._check_intact(damaged)
    return None

  def restore_newest(self, template_of):
    """``(step, state, record)`` of the newest intact checkpoint (``state`` restored into
    ``template_of(record)``), or None without checkpoints. Each damaged newer one gets a warning
    line and is removed (the resumed run writes its step again); a one-line UserError if none is
    intact."""
    _quiet_closed_loop()
    damaged = []
    for step in self.steps():
      try:
        record = self.record(step)
        state, _ = self.restore(step, template_of(record))
      except DAMAGE as e:
        damaged.append((step, _reason(e)))
        continue
      for bad, reason in damaged:
        log.warning(f'warning: checkpoint {self.directory / str(bad)} is damaged ({reason}): '
                    f'removed, resuming from checkpoint {step}')
        self._manager.delete(bad)
      return step, state, record
    self._check_intact(damaged)
    return None

  def _check_intact(self, damaged: list[tuple[int, str]]) -> None:
    """Raises the line for checkpoints that are all ``damaged`` ((step, reason), newest first)."""
    if damaged:
      step, reason = damaged[0]
      raise UserError(f'no intact checkpoint in {self.directory}: checkpoint {step} is damaged '
                      f'({reason}){" and so are the older ones" if len(damaged) > 1 else ""}: '
                      'pass --overwrite to start the run again')

  def close(self) -> None:
    self._manager.close()


def recorded_config(directory) -> tuple[bool, dict | None]:
  """Whether ``directory`` holds a checkpoint, and the config recorded in the newest readable
  record (None if it records none; a UserError if none is readable); creates nothing."""
  if not Path(directory).is_dir():
    return False, None
  checkpoints = Checkpoints(directory, None)
  try:
    held, record = bool(checkpoints.steps()), checkpoints.newest_record()
  finally:
    checkpoints.close()
  return held, record.get('config') if isinstance(record, dict) else None


def _pack(tree) -> tuple[dict, list]:
  """The leaves of ``tree`` (replicated arrays) on the host, concatenated into one flat array
  per dtype, and their table: ``[path, shape, dtype]`` in order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  host = [np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x) for _, x in leaves]
  packed = {}
  for x in host:
    packed.setdefault(x.dtype.name, []).append(x.ravel())
  return ({dtype: np.concatenate(parts) for dtype, parts in packed.items()},
          [[jax.tree_util.keystr(path), list(x.shape), x.dtype.name]
           for (path, _), x in zip(leaves, host)])


def _unpack(packed: dict, table: list, template=None):
  """The arrays that ``_pack`` made into ``packed`` and ``table``, in the structure of
  ``template`` if given, else by path."""
  start, arrays = dict.fromkeys(packed, 0), []
  for _, shape, dtype in table:
    size = math.prod(shape)
    arrays.append(packed[dtype][start[dtype]:start[dtype] + size].reshape(shape))
    start[dtype] += size
  if template is None:
    return {path: x for (path, _, _), x in zip(table, arrays)}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  expected = [[jax.tree_util.keystr(path), list(x.shape), np.dtype(x.dtype).name]
              for path, x in leaves]
  if expected != table:
    raise ValueError('its arrays are not those of the state it should resume')
  return jax.tree.unflatten(treedef, arrays)


def _reason(e: Exception) -> str:
  text = (str(e).strip() or type(e).__name__).splitlines()[0]
  return text if len(text) <= 120 else text[:120] + '...'


def _quiet_closed_loop() -> None:
  """Once a read fails, orbax closes its event loop while tensorstore still finishes the reads
  it had started: each then reports 'Event loop is closed' (hundreds of tracebacks on stderr) and
  asyncio logs the failures nobody collected. From the first restore on, both are dropped."""
  hook = sys.unraisablehook
  if getattr(hook, 'quiet_closed_loop', False):
    return

  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      hook(unraisable)
  quiet.quiet_closed_loop = True
  sys.unraisablehook = quiet
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
