"""Run outputs: TensorBoard scalars, a plain-text log, progress lines with rate and ETA, the
search statistics of reference §9, and atomic JSON files."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from itertools import product
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter

from prnas_jax import ops, parallel
from prnas_jax.files import atomic_open
from prnas_jax.space import CellSpace

log = logging.getLogger('prnas_jax')


def setup_logging(workdir: Path) -> None:
  """INFO lines to stderr and (main process only) to ``workdir/log.txt``; with several
  processes each line names its process."""
  log.setLevel(logging.INFO)
  log.handlers.clear()
  who = f'[{jax.process_index()}/{jax.process_count()}] ' if jax.process_count() > 1 else ''
  fmt = logging.Formatter(f'%(asctime)s {who}%(message)s', '%H:%M:%S')
  handlers = [logging.StreamHandler(sys.stderr)]
  if parallel.is_main_process():
    handlers.append(logging.FileHandler(workdir / 'log.txt'))
  for handler in handlers:
    handler.setFormatter(fmt)
    log.addHandler(handler)
  log.propagate = False


class Writer:
  """Scalars to TensorBoard (``workdir/tb``) and, one JSON object per call, to
  ``workdir/scalars.jsonl`` (what reports and tests read back). Only the main process writes;
  the others count the records."""

  def __init__(self, workdir: Path):
    self._main = parallel.is_main_process()
    if self._main:
      self._tb = SummaryWriter(str(Path(workdir) / 'tb'), flush_secs=30)
      self._jsonl = open(Path(workdir) / 'scalars.jsonl', 'a', encoding='utf-8')
    # records so far (the main process's count is the one checkpoints remember)
    self.lines = len(read_scalars(workdir)) if self._main else 0

  def scalars(self, step: int, values: dict) -> None:
    self.lines += 1
    if not self._main:
      return
    values = {tag: float(v) for tag, v in values.items()}
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, step)
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def close(self):
    if self._main:
      self._tb.close()
      self._jsonl.close()


def read_scalars(workdir: Path) -> list[dict]:
  """The records of ``scalars.jsonl``; a torn last line and lines that are not a record (a JSON
  object with a step) are skipped."""
  out = []
  with open(Path(workdir) / 'scalars.jsonl', encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and 'step' in record:
        out.append(record)
  return out


def truncate_scalars(workdir: Path, records: int) -> None:
  """Keeps the first ``records`` records of ``scalars.jsonl`` (on resume: drops what was logged
  after the checkpoint, which the resumed run logs again)."""
  path = Path(workdir) / 'scalars.jsonl'
  if path.exists() and parallel.is_main_process():
    with atomic_open(path) as f:
      f.writelines(json.dumps(r) + '\n' for r in read_scalars(workdir)[:records])


class Progress:
  """A periodic line: position, rate and ETA of a stage and of the whole run, counted in
  images (the batch may change between stages)."""

  def __init__(self, total_images: int, every: int):
    self.total, self.every, self.done = total_images, max(1, every), 0
    self.start = time.perf_counter()

  def update(self, stage: str, step: int, steps: int, images: int, fields) -> None:
    """Counts a step of ``images`` images; every ``every`` steps and at the end logs a line
    (``fields()`` is called only then, so device values are fetched only then)."""
    self.done += images
    if step % self.every and step != steps:
      return
    rate = self.done / (time.perf_counter() - self.start)
    eta = (self.total - self.done) / rate if rate else float('inf')
    extra = ' '.join(f'{k} {v:.4g}' for k, v in fields().items())
    log.info(f'{stage} step {step}/{steps} | {rate:.1f} img/s | run '
             f'{100 * min(self.done / self.total, 1):.0f}% ETA {_duration(max(eta, 0))} | '
             f'{extra}')


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  h, rem = divmod(int(seconds), 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


# ------------------------------------------------------------------------------ search stats


def _kwargs(spec) -> dict:
  if isinstance(spec, ops.Conv):
    return {'c_mul': list(spec.mul), 'dil': spec.d, 'k': spec.k}
  if isinstance(spec, ops.Pool):
    return {'k': spec.k, 'type': spec.kind}
  return {}


def similarity(a, b) -> float:
  """Reference §9: 0 across families; else the mean of 1 and a score per argument (equal
  scalars 1; lists: 1/n for equal length plus 1/n per equal leading entry, n = min length + 1)."""
  if a.family != b.family:
    return 0.0
  ka, kb = _kwargs(a), _kwargs(b)
  scores = [1.0]
  for key in ka:
    x, y = ka[key], kb[key]
    if isinstance(x, list):
      n = min(len(x), len(y)) + 1
      scores.append((len(x) == len(y)) / n + sum(u == v for u, v in zip(x[:n - 1], y)) / n)
    else:
      scores.append(float(x == y))
  return float(np.mean(scores))


def space_stats(name: str, cell: CellSpace) -> dict[str, float]:
  """Per edge and averaged: candidate count, op similarity, family fractions, conv kernels."""
  out, fams = {}, Counter()
  sims = []
  families = ('conv', 'none', 'pool', 'skip')
  for e, specs in enumerate(cell.active_specs()):
    n = len(specs)
    out[f'{name}/candidates/p{e}'] = n
    sims.append(np.mean([similarity(a, b) for a, b in product(specs, specs)]) if n else 0.0)
    out[f'{name}_similarity/p{e}'] = sims[-1]
    count = Counter(s.family for s in specs)
    fams.update(count)
    for fam in families:
      out[f'{name}_type/p{e}/{fam}'] = count[fam] / max(n, 1)
    kernels = Counter(s.k for s in specs if isinstance(s, ops.Conv))
    for k in (1, 3, 5, 7):
      out[f'{name}_conv_k/p{e}/k{k}'] = kernels[k] / max(n, 1)
  total = max(sum(fams.values()), 1)
  for fam in families:
    out[f'{name}_type/avg/{fam}'] = fams[fam] / total
  out[f'{name}_similarity/avg'] = float(np.mean(sims))
  out[f'{name}/discovered'] = len(cell.candidates)
  return out
