"""Atomic file writes (a run never leaves a half-written result behind) and a lock between
the processes of one machine."""
from __future__ import annotations

import contextlib
import fcntl
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


@contextlib.contextmanager
def lock(path):
  """Holds an exclusive lock on the file ``path`` (created if missing): the processes of one
  machine that download or convert the same data set take turns."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
    yield
