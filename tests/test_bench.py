"""The benchmark suite (scripts/bench.py): its smallest run reports every field of every case it
ran, with no program of the update compiled twice; the budget skips, and says so, what it cannot
fit."""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMES = ('backend_s', 'build_s', 'compile_s', 'first_step_s', 'time_to_first_step_s', 'step_s',
         'wall_s')


@functools.cache
def _bench():
  """scripts/bench.py as a module, loaded once (it defines absl flags)."""
  spec = importlib.util.spec_from_file_location('bench', ROOT / 'scripts' / 'bench.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def suite(tmp_path_factory):
  """The JSON, the table file and the output of the suite at its smallest: 3 cells, C=4, batch
  8, one timed step, the `first` supernet per candidate and the DL2 retraining network."""
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  proc = subprocess.run(
      [sys.executable, 'scripts/bench.py', '--layers', '3', '--channels', '4', '--batch', '8',
       '--steps', '1', '--cases', 'first/candidates,retrain', '--out', str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), out.with_suffix('.md').read_text(), proc.stdout


def test_every_case_reports_every_field(suite):
  result, _, _ = suite
  rows = result['rows']
  assert [(r['case'], r['cache'], r['status'], r['phase']) for r in rows] == [
      ('first/candidates', 'cold', 'ok', 'done'), ('retrain', 'cold', 'ok', 'done')]
  for row in rows:
    assert all(row[k] > 0 for k in TIMES), row
    assert row['time_to_first_step_s'] == pytest.approx(
        row['build_s'] + row['compile_s'] + row['first_step_s'])
    assert row['wall_s'] > row['time_to_first_step_s']
    assert row['images_per_s'] == pytest.approx(8 / row['step_s'])
    assert (row['batch'], row['layers'], row['channels']) == (8, 3, 4)
    assert (row['backend'], row['devices'], row['memory_kind']) == ('cpu', 1, 'peak RSS')
    assert '--xla_cpu_use_fusion_emitters=false' in row['xla_flags']  # set_xla_flags's
    assert row['memory_mib'] == row['peak_rss_mib'] > 100
    assert row['build_programs'] > 0 and row['compile_programs'] > 0
    assert all(row[f'compile_{part}_s'] > 0 for part in ('trace', 'lower', 'xla')), row
    assert row['compiles_after_warmup'] == sum(row['compiled_after_warmup'].values())
    assert row['recompiles'] == 0, row['compiled_after_warmup']  # state placed as the runs do
  search, retrain = rows
  assert (search['stage'], search['programs'], search['dw_form']) == ('first', 'candidates',
                                                                      'shift')
  assert 0 < search['alpha_s'] < search['step_s'] and 0 < search['weight_s'] < search['step_s']
  assert retrain['genotype'] == 'DL2' and 0 < retrain['params'] < 100_000


def test_one_table(suite):
  _, text, stdout = suite
  lines = text.splitlines()
  assert len(lines) == 4 and lines[0].startswith('| case | cache | status | build s')
  assert lines[2].startswith('| first/candidates | cold | ok |')
  assert lines[3].startswith('| retrain | cold | ok |')
  assert text in stdout


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_a_phase_reports_its_compiles_as_they_finish():
  """A case killed in its compile still says how far tracing, lowering and XLA got."""
  reports = []
  rec = _bench().Record(reports.append, 8, '', search=False)
  with rec.phase('compile'):
    jax.jit(lambda x: x * time.time()).lower(1.0).compile()  # a new constant: no cache hit
    during = reports[-1]
  assert during['phase'] == 'compile' and 'compile_s' not in during
  assert all(during[f'compile_{part}_s'] > 0 for part in ('trace', 'lower', 'xla')), during
  assert rec.fields['compile_xla_s'] == during['compile_xla_s'] and rec.fields['compile_s'] > 0
  assert 'compile_profile' not in rec.fields


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_a_profiled_compile_names_where_its_time_went():
  rec = _bench().Record(lambda fields: None, 8, '', search=False)
  rec.profile = True
  with rec.phase('compile'):
    jax.jit(lambda x: jax.numpy.sin(x) * time.time()).lower(1.0).compile()
  top = rec.fields['compile_profile']
  assert 0 < len(top) <= _bench().PROFILE_TOP
  assert [t for _, _, t, _ in top] == sorted((t for _, _, t, _ in top), reverse=True)
  assert any('Compile' in name and count >= 1 for _, name, _, count in top), top
  assert all(thread.startswith('/host:CPU/') for thread, _, _, _ in top), top
  threads = rec.fields['compile_profile_threads']
  assert threads['/host:CPU/python'][0] >= max(t for thread, _, t, _ in top
                                               if thread == '/host:CPU/python')


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_profiled_steps_give_their_activities_per_step():
  """The timed steps' figures are reported before the profiled steps, which a timeout may cut."""
  reports = []
  rec = _bench().Record(reports.append, 8, '', search=False)
  rec.profile_steps, rec.fields['build_s'], rec.fields['compile_s'] = 2, 0.0, 0.0
  f = jax.jit(lambda x: jax.numpy.sin(x) @ x)
  rec.steps(lambda x, i: f(x), jax.numpy.ones((64, 64)), 2, lambda: {'alpha_s': 1.0})
  top = rec.fields['step_profile']
  assert any(name.startswith('sin') and count == 1 for _, name, _, count in top), top  # per step
  before_profile = [r for r in reports if 'step_profile' not in r][-1]
  assert before_profile['step_s'] > 0 and before_profile['alpha_s'] == 1.0


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_budget_shares_and_skips(tmp_path):
  """Each case gets an equal share of what is left; a warm rerun follows only a cold run that
  finished; a share too short to start is a skipped row, never a missing one."""
  bench = _bench()
  assert bench.select(['retrain', 'first']) == ['retrain', 'first/pieces', 'first/edges',
                                                'first/candidates', 'first/whole']
  assert bench.select(['nothing']) == []
  now, limits = [0.0], []
  took = {('first/pieces', 'cold'): 30, ('first/pieces', 'warm'): 5, ('retrain', 'cold'): 20}

  def run(case, argv, limit, cache_dir, result):
    cache = 'warm' if result.name.endswith('-warm.jsonl') else 'cold'
    limits.append(limit)
    seconds = took.get((case, cache), limit)
    now[0] += seconds
    return {'status': 'ok' if seconds < limit else 'timeout', 'wall_s': seconds}

  rows = bench.run_suite(['first/pieces', 'mid/whole', 'retrain'], [], 100, 600, True, tmp_path,
                         run=run, clock=lambda: now[0])
  assert [(r['case'], r['cache'], r['status']) for r in rows] == [
      ('first/pieces', 'cold', 'ok'), ('first/pieces', 'warm', 'ok'),
      ('mid/whole', 'cold', 'timeout'), ('mid/whole', 'warm', 'skipped'),
      ('retrain', 'cold', 'ok'), ('retrain', 'warm', 'skipped')]
  assert limits == pytest.approx([100 / 3, 70 / 3, 65 / 2, 32.5])
  assert rows[3]['reason'] == 'cold run timeout' and rows[5]['reason'].startswith('budget')
  text = bench.table(rows)
  assert '| retrain | warm | skipped: budget: 12 s left for 1 case |' in text


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_cold_runs_at_once_then_warm_alone(tmp_path):
  """With jobs, the cold runs overlap in half the budget; the warm reruns run one at a time,
  never beside another run, each with an equal share of what is left."""
  bench = _bench()
  now, running, log = [0.0], [], []

  def run(case, argv, limit, cache_dir, result):
    cache = 'warm' if result.name.endswith('-warm.jsonl') else 'cold'
    running.append(case)
    log.append((case, cache, limit, len(running)))
    time.sleep(0.05)  # the cold runs are all started before the first returns
    running.remove(case)
    now[0] += 10
    return {'status': 'timeout' if case == 'mid/whole' else 'ok', 'wall_s': 10}

  rows = bench.run_suite(['first/pieces', 'mid/whole', 'retrain'], [], 100, 600, True, tmp_path,
                         run=run, clock=lambda: now[0], jobs=3)
  cold = [entry for entry in log if entry[1] == 'cold']
  assert sorted(c for c, *_ in cold) == ['first/pieces', 'mid/whole', 'retrain']
  assert [limit for _, _, limit, _ in cold] == [50] * 3 and max(n for *_, n in cold) == 3
  warm = [entry for entry in log if entry[1] == 'warm']
  assert [(c, n) for c, _, _, n in warm] == [('first/pieces', 1), ('retrain', 1)]
  assert [limit for _, _, limit, _ in warm] == pytest.approx([70 / 3, 60])
  assert [(r['case'], r['cache'], r['status']) for r in rows] == [
      ('first/pieces', 'cold', 'ok'), ('first/pieces', 'warm', 'ok'),
      ('mid/whole', 'cold', 'timeout'), ('mid/whole', 'warm', 'skipped'),
      ('retrain', 'cold', 'ok'), ('retrain', 'warm', 'ok')]


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_a_variant_reruns_a_case_with_its_flags(tmp_path):
  """``--variant 'NAME ARG...'``: its XLA flags reach the child's XLA_FLAGS (in place of the
  same flags given before), its other arguments the child's flags; a failed child's row says
  why in one line, XLA's fatal check rather than the interpreter's dump after it."""
  bench = _bench()
  named = bench.variants(['at0 --xla_gpu_autotune_level=0 --train_config.model.dw_form=dense',
                          'bad --xla_no_such_flag=1', 'odd --train_config.model.dw_form=nonsense'])
  assert named['at0'] == (('--xla_gpu_autotune_level=0',), ('--train_config.model.dw_form=dense',))
  assert bench.with_xla_flags('--xla_a=1 --xla_b=2', ['--xla_a=3']) == '--xla_b=2 --xla_a=3'
  with pytest.raises(SystemExit, match='new name'):
    bench.variants(['at0 --x', 'at0 --y'])
  log = 'W1204 x.cc:1] slow\nF1204 12:27:54.3 6026 t.cc:703] Check failed: a == b\n' \
        'Fatal Python error: Aborted\n\nExtension modules: numpy (total: 1)\n'
  assert bench.error_line(log, -6) == 'Check failed: a == b'
  assert bench.error_line('Traceback:\nValueError: x\n\nFor simplicity, JAX has removed', 1) == \
      'ValueError: x'
  assert bench.error_line('', 2) == 'exit status 2'
  small = ['--layers', '3', '--channels', '4', '--batch', '8', '--steps', '1']
  rows = {name: bench.run_child(f'retrain+{name}', small, 120, tmp_path / name,
                                tmp_path / f'{name}.jsonl', variants=named)
          for name in ('bad', 'odd')}
  assert rows['bad']['status'] == 'failed' and 'xla_no_such_flag' in rows['bad']['error']
  assert rows['odd']['status'] == 'failed' and 'nonsense' in rows['odd']['error']
  assert '\n' not in rows['odd']['error'] and rows['odd']['phase'] == 'build'
