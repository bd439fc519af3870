"""Atomic file writes: a run never leaves a half-written result behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from prnas_jax import parallel


@contextlib.contextmanager
def atomic_open(path, mode: str = 'w'):
  """Opens a temporary file beside ``path``; on success it is synced and renamed to ``path``,
  on failure removed."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path, obj) -> None:
  """Writes ``obj`` to ``path`` (in the main process only: the others hold the same result)."""
  if not parallel.is_main_process():
    return
  with atomic_open(path) as f:
    json.dump(obj, f, indent=1)
