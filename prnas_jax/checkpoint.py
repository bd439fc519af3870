"""Checkpoints of a run through orbax: a pytree of arrays plus a JSON record, under
``WORKDIR/checkpoints/<step>``.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed while saving leaves the previous checkpoint as the latest readable one; leftover
temporary directories are removed on the next start. Nothing is unpickled: arrays are read as
arrays into the caller's template, the record as JSON.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from prnas_jax.errors import UserError


class Checkpoints:
  """The checkpoints of one run; at most ``keep`` are kept (the newest)."""

  def __init__(self, directory, keep: int):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, record: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``record`` (JSON-able) as checkpoint ``step``."""
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
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
    """``(state, record)`` of checkpoint ``step``; ``state`` as host arrays with the structure,
    shapes and dtypes of ``template`` (arrays or ``jax.ShapeDtypeStruct``), or without one as
    saved. The caller places them (``parallel.replicate``), exactly as a fresh state is placed,
    so a resumed step compiles to the uninterrupted run's program."""
    if template is not None:  # read unsharded: every process reads the whole (replicated) state
      template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), record=ocp.args.JsonRestore()))
    return jax.tree.map(np.asarray, out['state']), out['record']

  def close(self) -> None:
    self._manager.close()
