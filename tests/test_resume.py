"""Kill anywhere, resume exactly: a two-stage search as a subprocess, SIGKILLed mid-epoch, between
stages and while writing a checkpoint, each time rerun with the same workdir, ends exactly as an
uninterrupted run of the same config (genotype, stage records, scalars, final weights and alphas).
So does a run whose newest checkpoint was damaged: it resumes from the one before. The runs share
a persistent XLA cache: only the reference run compiles from scratch."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import extract_cifar
from prnas_jax import checkpoint, metrics

ROOT = Path(__file__).resolve().parents[1]
# 120 images: 3 steps of 20 per epoch; stage 0 (4 candidates per edge) 2 epochs, stage 1 (2) 1
OVERRIDES = ['--config.data.max_train=120', '--config.search.batch_size=20',
             '--config.search.init_channels=4', '--config.log_every=1',
             "--config.search.stages.epochs=(2, 1)", "--config.search.stages.grace_epochs=(1, 0)",
             "--config.search.stages.keep=(2, 1)", "--config.search.stages.new=(1, 0)",
             "--config.search.stages.add_layers=(0, 0)", "--config.search.stages.add_width=(0, 0)",
             "--config.search.stages.skip_dropout=(0.0, 0.0)"]
TIMING = {'epoch/seconds', 'epoch/images_per_s', 'stage/compile_s', 'stage/images_per_s'}
TIMEOUT = 300


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The subprocesses' environment, with the data folder as ``FOLDER``."""
  root = extract_cifar(tmp_path_factory.mktemp('resume'), 'train/*/00[0-1]?.jpg')
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
          'JAX_COMPILATION_CACHE_DIR': str(root / 'xla'), 'XDG_CACHE_HOME': str(root / 'xdg'),
          'FOLDER': str(root)}


def _start(workdir: Path, env) -> subprocess.Popen:
  """The search into ``workdir``; its output goes to ``workdir.out``."""
  cmd = [sys.executable, '-m', 'prnas_jax.search', '--config', 'configs/tiny.py', '--workdir',
         str(workdir), '--config.data.dataset=folder', f'--config.data.folder={env["FOLDER"]}',
         *OVERRIDES]
  with open(f'{workdir}.out', 'a', encoding='utf-8') as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _output(workdir: Path) -> str:
  return Path(f'{workdir}.out').read_text()


def _finish(workdir: Path, env) -> None:
  assert _start(workdir, env).wait(TIMEOUT) == 0, _output(workdir)[-3000:]


def _kill_when(workdir: Path, env, event) -> None:
  """Runs the search until ``event(workdir, new log text)`` holds, then SIGKILLs it."""
  log = workdir / 'log.txt'
  offset = log.stat().st_size if log.exists() else 0
  proc = _start(workdir, env)
  deadline = time.monotonic() + TIMEOUT
  try:
    while True:
      assert proc.poll() is None, f'the run ended before the kill:\n{_output(workdir)[-3000:]}'
      assert time.monotonic() < deadline, 'the kill point never came'
      text = log.read_text()[offset:] if log.exists() else ''
      if event(workdir, text):
        break
      time.sleep(0.002)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _checkpoints(workdir: Path) -> tuple[list[int], list[str]]:
  """The complete checkpoints' steps and the names of half-written ones, as on disk."""
  names = [p.name for p in (workdir / 'checkpoints').iterdir()]
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if 'tmp' in n]


def _writing_checkpoint(step: int):
  """The event: checkpoint ``step`` is being written (its temporary directory exists)."""
  return lambda workdir, _: (workdir / 'checkpoints').is_dir() and any(
      name.startswith(f'{step}.') for name in _checkpoints(workdir)[1])


# (kill point, the event, the newest complete checkpoint after the kill); checkpoint numbering:
# 0 = stage 0's start, 1 and 2 after its epochs, 3 = stage 1's start, 4 after its epoch. The last
# kill hits the writing of checkpoint 4, so the final rerun resumes at stage 1's start.
KILLS = [
    ('mid-epoch', lambda w, log: 'stage 0 epoch 2/2 step 2/3 |' in log, 1),
    ('between stages', lambda w, log: (w / 'stages' / 'stage0.json').exists(), 2),
    ('while writing a checkpoint', _writing_checkpoint(4), 3),
]


@pytest.fixture(scope='module')
def reference(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  _finish(workdir, env)
  return workdir


@pytest.fixture(scope='module')
def killed(env, reference, tmp_path_factory):
  """The same search killed at every ``KILLS`` point in turn, then run to its end; the newest
  complete checkpoint and the half-written ones after each kill."""
  workdir = tmp_path_factory.mktemp('killed') / 'run'
  after = []
  for _, event, _ in KILLS:
    _kill_when(workdir, env, event)
    after.append(_checkpoints(workdir))
  _finish(workdir, env)
  return workdir, after


def test_the_kills_hit_their_points(killed):
  workdir, after = killed
  assert [steps[-1] for steps, _ in after] == [latest for _, _, latest in KILLS]
  assert after[-1][1], 'no half-written checkpoint was left by the last kill'
  assert all(len(steps) <= 2 for steps, _ in after)  # search.checkpoints_kept
  log = (workdir / 'log.txt').read_text()
  for step, stage, epoch in [(1, 0, 1), (2, 0, 2), (3, 1, 0)]:
    assert f'resuming from checkpoint {step} (stage {stage}, epoch {epoch})' in log
  assert _checkpoints(workdir) == ([3, 4], [])  # the half-written one was removed


def _probs(probs) -> dict:
  """A stage record's probabilities by (cell type, edge, candidate)."""
  return {(kind, e, c): p for kind, edges in probs.items() for e, edge in enumerate(edges)
          for c, p in edge.items()}


def test_same_genotype_and_stages(reference, killed):
  workdir = killed[0]
  assert (workdir / 'genotype.json').read_bytes() == (reference / 'genotype.json').read_bytes()
  assert (workdir / 'genotype_darts.json').exists() == (reference /
                                                        'genotype_darts.json').exists()
  for i in range(2):
    ours, theirs = (json.loads((w / 'stages' / f'stage{i}.json').read_text())
                    for w in (workdir, reference))
    our_probs, their_probs = _probs(ours.pop('probs')), _probs(theirs.pop('probs'))
    assert ours == theirs  # pruned, created, failed morphs, the space
    assert our_probs.keys() == their_probs.keys()
    np.testing.assert_allclose(list(our_probs.values()), list(their_probs.values()), rtol=0,
                               atol=1e-6)


def test_same_scalars_without_duplicates(reference, killed):
  ours, theirs = metrics.read_scalars(killed[0]), metrics.read_scalars(reference)
  assert [sorted(r) for r in ours] == [sorted(r) for r in theirs]
  for a, b in zip(ours, theirs):
    assert {k: v for k, v in a.items() if k not in TIMING} == pytest.approx(
        {k: v for k, v in b.items() if k not in TIMING}, rel=1e-6)


def _final(workdir):
  """The newest checkpoint's arrays (by path) and record."""
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', 2)
  tree, record = checkpoints.restore(checkpoints.latest(), None)
  checkpoints.close()
  return tree, record


def test_same_final_weights_and_alphas(reference, killed):
  (ours, our_record), (theirs, their_record) = _final(killed[0]), _final(reference)
  assert ours.keys() == theirs.keys() and any('alphas' in k for k in ours)
  for path, value in theirs.items():
    np.testing.assert_allclose(ours[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
  for record in (our_record, their_record):
    del record['compile_s'], record['train_s']
  assert our_record == their_record


def test_a_finished_search_only_reports_its_genotype(reference, env):
  before = (reference / 'genotype.json').stat().st_mtime_ns
  _finish(reference, env)
  log = (reference / 'log.txt').read_text()
  assert log.count('has finished: genotype: {') == 1 and log.count('compiling') == 2
  assert (reference / 'genotype.json').stat().st_mtime_ns == before


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(reference, env, tmp_path):
  """The reference run with its final checkpoint's arrays truncated and its genotype gone:
  one warning line, no tracebacks, and the same genotype from stage 1's start."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for name in ('genotype.json', 'genotype_darts.json', 'log.txt'):
    (workdir / name).unlink(missing_ok=True)
  for path in (workdir / 'checkpoints' / '4' / 'state' / 'd').iterdir():
    os.truncate(path, path.stat().st_size // 2)
  _finish(workdir, env)
  out = _output(workdir)
  assert [line for line in out.splitlines() if 'warning:' in line] == [
      line for line in out.splitlines() if f'checkpoint {workdir}/checkpoints/4 is damaged' in line
      and line.endswith('removed, resuming from checkpoint 3')], out
  assert len([line for line in out.splitlines() if 'warning:' in line]) == 1
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out[:3000]
  assert 'resuming from checkpoint 3 (stage 1, epoch 0)' in out
  assert (workdir / 'genotype.json').read_bytes() == (reference / 'genotype.json').read_bytes()


DAMAGE = {
    'record emptied': ('record/metadata', lambda p: p.write_text('')),
    'record a JSON array': ('record/metadata', lambda p: p.write_text('[]')),
    'array metadata lost': ('state/_METADATA', os.remove),
    'array data truncated': ('state/d/*', lambda p: os.truncate(p, p.stat().st_size // 2)),
    'array index truncated': ('state/manifest.ocdbt', lambda p: os.truncate(p, 10)),
    'record lost': ('record', shutil.rmtree),
    'array table emptied': ('table/metadata', lambda p: p.write_text('')),
    'array table lost': ('table', shutil.rmtree),
    'array table of other shapes': ('table/metadata', lambda p: p.write_text(
        '[["[\'w\']", [999], "float32"], ["[\'b\']", [3], "int32"]]')),
}


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.mark.parametrize('damage', DAMAGE)
def test_each_damaged_file_falls_back_to_the_checkpoint_before(damage, tmp_path):
  """Checkpoints 1 and 2 of a small state; a file of checkpoint 2 damaged: checkpoint 1 is
  restored into a template that reads the record, with one warning, and 2 is removed."""
  checkpoints = checkpoint.Checkpoints(tmp_path, 2)
  for step in (1, 2):
    checkpoints.save(step, {'w': np.full(1000, step, np.float32), 'b': np.zeros(3, np.int32)},
                     {'step': step})
  pattern, damage_file = DAMAGE[damage]
  for path in (tmp_path / '2').glob(pattern):
    damage_file(path)
  handler = _Lines()
  logging.getLogger('prnas_jax').addHandler(handler)
  try:
    step, state, record = checkpoints.restore_newest(lambda record: record['step'] and {
        'w': np.zeros(1000, np.float32), 'b': np.zeros(3, np.int32)})
  finally:
    logging.getLogger('prnas_jax').removeHandler(handler)
  assert (step, record, float(state['w'][0])) == (1, {'step': 1}, 1.0)
  assert len(handler.lines) == 1 and f'checkpoint {tmp_path}/2 is damaged' in handler.lines[0]
  assert checkpoints.steps() == [1]
  checkpoints.save(2, state, record)  # the resumed run writes its step again
  checkpoints.close()


def test_packed_arrays_restore_exactly(tmp_path):
  """Arrays of several dtypes and shapes (scalars among them), nested in lists and dicts, come
  back bit for bit in the template's structure, or by path without one."""
  rng = np.random.default_rng(0)
  tree = {'a': [rng.standard_normal((2, 3)).astype(np.float32), np.int32(7)],
          'b': {'key': np.array([1, 2**32 - 1], np.uint32),
                'w': rng.standard_normal(5).astype(np.float32), 'n': np.arange(4, dtype=np.int32)}}
  checkpoints = checkpoint.Checkpoints(tmp_path, 2)
  checkpoints.save(3, tree, {'step': 3})
  state, record = checkpoints.restore(3, tree)
  by_path, _ = checkpoints.restore(3)
  checkpoints.close()
  assert record == {'step': 3}
  assert jax.tree.structure(state) == jax.tree.structure(tree)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(state),
                               strict=True):
    assert got.dtype == np.asarray(want).dtype and np.array_equal(got, want)
    assert np.array_equal(by_path[jax.tree_util.keystr(path)], want)
  assert len(by_path) == 5
