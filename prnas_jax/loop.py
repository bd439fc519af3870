"""The epoch loop that a search stage and a retraining run share: the steps with a progress
line, the check that every step's loss is finite, an evaluation, the epoch's log line and
scalars, and a checkpoint after every epoch (docs/design.md, "Runs")."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Iterable

import jax
import numpy as np

from prnas_jax import metrics
from prnas_jax.errors import UserError
from prnas_jax.metrics import log


@dataclasses.dataclass(frozen=True)
class Epochs:
  """What the loop needs to know of a run's epochs."""
  count: int
  steps: int  # per epoch
  batch: int  # global batch size
  evaluation: str  # the evaluated split's name in logs and scalars: 'valid' or 'test'
  evaluate_from: int  # the first epoch (0-based) that is evaluated
  nan_fix: str  # what to do when a loss is not finite
  label: str = ''  # before 'epoch i/n' in every line, e.g. 'stage 2 '
  scalar_offset: int = 0  # the scalars' step of epoch e is scalar_offset + e


@contextlib.contextmanager
def frozen_heap():
  """Python's cycle collector leaves the objects alive on entry alone until exit (``gc.freeze``):
  a supernet's traced modules and compile caches (1-2 million objects at 5 cells) made every
  full collection during the epochs scan them, 4.5 % of a small search's time."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


@frozen_heap()
def run(spec: Epochs, state, first: int, *, begin, evaluate, save,
        writer: metrics.Writer, progress: metrics.Progress):
  """Epochs ``first..spec.count-1`` from ``state``; returns the final state.

  ``begin(e)`` returns the epoch's rates (``{'lr': ..., ...}``, logged as ``epoch/<name>``) and
  its step ``(state, n) -> (state, metrics)`` (metrics with ``loss`` and ``accuracy``);
  ``evaluate(state)`` gives ``{'loss', 'accuracy'}``; ``save(epochs_done, state, result)``
  writes the checkpoint, after the scalars. A loss that is not finite stops the run with one
  line, before anything of that epoch is recorded. The objects alive at the start, compiled
  programs among them, are kept out of Python's cycle collector (``frozen_heap``)."""
  for e in range(first, spec.count):
    rates, step = begin(e)
    where = f'{spec.label}epoch {e + 1}/{spec.count}'
    sums, losses = {'loss': 0.0, 'accuracy': 0.0}, []  # on device: fetched when logged
    t0 = time.perf_counter()
    for n in range(spec.steps):
      state, m = step(state, n)
      sums = {k: sums[k] + m[k] for k in sums}
      losses.append(m['loss'])
      progress.update(where, n + 1, spec.steps, spec.batch,
                      lambda: {'loss': float(sums['loss']) / (n + 1), 'lr': rates['lr']})
    seconds = time.perf_counter() - t0
    losses = np.asarray(jax.device_get(losses))
    if not np.isfinite(losses).all():
      n = int(np.argmin(np.isfinite(losses)))
      raise UserError(f'the training loss became {losses[n]} in {where} step {n + 1}/'
                      f'{spec.steps}: {spec.nan_fix}')
    train = {k: float(v) / spec.steps for k, v in sums.items()}
    result = {'epoch': e, **rates, 'seconds': seconds,
              'images_per_s': spec.steps * spec.batch / seconds, 'train': train}
    scalars = {'train/loss': train['loss'], 'train/accuracy': train['accuracy']} | {
        f'epoch/{k}': v for k, v in rates.items()} | {
        'epoch/seconds': seconds, 'epoch/batch_size': spec.batch,
        'epoch/images_per_s': result['images_per_s']}
    line = f'{where}: train loss {train["loss"]:.4f} acc {train["accuracy"]:.4f}'
    if e >= spec.evaluate_from:
      result[spec.evaluation] = ev = evaluate(state)
      scalars |= {f'{spec.evaluation}/loss': ev['loss'],
                  f'{spec.evaluation}/accuracy': ev['accuracy']}
      line += f', {spec.evaluation} loss {ev["loss"]:.4f} acc {ev["accuracy"]:.4f}'
    log.info(f'{line} ({seconds:.1f} s, {result["images_per_s"]:.1f} img/s)')
    writer.scalars(spec.scalar_offset + e, scalars)
    save(e + 1, state, result)
  return state


def mean_loss_accuracy(sums: Iterable[dict]) -> dict:
  """``{'loss', 'accuracy'}`` over batches from their ``loss_sum``, ``correct`` and ``count``."""
  total = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  for out in sums:
    total = {k: total[k] + out[k] for k in total}
  count = int(total['count'])
  return {'loss': float(total['loss_sum']) / count, 'accuracy': int(total['correct']) / count}

