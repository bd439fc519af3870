"""Search pictures from a workdir: a small synthetic one written with the search's own functions
(no training, no compiles), an unfinished one, and one-line errors for what is not a workdir."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prnas_jax import genotype, metrics, report, space
from prnas_jax.config import STAGE_KEYS
from prnas_jax.errors import UserError
from prnas_jax.files import write_json

ROOT = Path(__file__).resolve().parents[1]


def _fake_search(workdir, stages=3):
  """What a tiny search logs (scalars, stage records, genotype), with random probabilities."""
  config = runpy.run_path(str(ROOT / 'configs' / 'tiny.py'))['get_config']()
  st, rng = config.search.stages, np.random.default_rng(0)
  sp, writer, epoch = space.initial_space('prdarts4'), metrics.Writer(workdir), 0
  for i in range(stages):
    for kind, cell in sp.items():
      writer.scalars(i, metrics.space_stats(f'switches_{kind}', cell))
    writer.scalars(i, {f'stage/{k}': st[k][i] for k in STAGE_KEYS})
    for e in range(st.epochs[i]):
      scalars = {'train/accuracy': 0.2 + 0.05 * epoch, 'epoch/lr': 0.025 / (1 + e)}
      if e == st.epochs[i] - 1:
        scalars['valid/accuracy'] = 0.15 + 0.05 * epoch
      writer.scalars(epoch, scalars)
      epoch += 1
    probs = {kind: [dict(zip(cell.active(e), rng.dirichlet(np.ones(len(cell.active(e))))))
                    for e in range(cell.num_edges)] for kind, cell in sp.items()}
    record = {'stage': i, 'probs': {kind: [{str(sp[kind].candidates[c]): p for c, p in e.items()}
                                           for e in probs[kind]] for kind in sp}}
    record['events'] = space.prune_and_replace(sp, probs, config.search, i, rng)
    record['space'] = {kind: cell.to_json() for kind, cell in sp.items()}
    write_json(workdir / 'stages' / f'stage{i}.json', record)
  if stages == len(st.epochs):
    for kind, cell in sp.items():
      writer.scalars(stages, metrics.space_stats(f'switches_{kind}', cell))
    genotype.save(genotype.DL2, workdir / 'genotype.json')
  writer.close()
  return workdir


def test_finished_search(tmp_path, check_picture):
  paths = report.draw_run(_fake_search(tmp_path))
  assert [p.name for p in paths] == ['report.png', 'pool.png', 'cell_normal.png',
                                     'cell_reduce.png']
  check_picture(tmp_path / 'report.png', min_size=(1200, 900))
  check_picture(tmp_path / 'pool.png', min_size=(600, 600))
  check_picture(tmp_path / 'cell_normal.png', min_size=(800, 300))


def test_logs_axes(tmp_path):
  logs = report.Logs(_fake_search(tmp_path))
  assert logs.bounds.tolist() == [0, 2, 4, 6]
  x, lr = logs.epoch_series('epoch/lr')  # broken between stages
  assert np.isnan(x).sum() == 2 and x[0] == 0.5 and x[-1] == 5.5
  x, n = logs.stage_series('switches_normal/candidates/p0')  # stage 0, 1, 2, final pool
  assert x.tolist() == [0, 2, 4, 6] and n[0] == 4 and n[-1] == 1
  assert len(logs.edges('reduce', '/candidates')) == 14
  with open(tmp_path / 'scalars.jsonl', 'a') as f:  # a rerun appends: the later record wins
    f.write(json.dumps({'step': 0, 'epoch/lr': 1.0}) + '\n')
  assert report.Logs(tmp_path).epoch_series('epoch/lr')[1][0] == 1.0
  with open(tmp_path / 'scalars.jsonl', 'a') as f:  # lines that are no record are skipped
    f.write('[1, 2]\n{"epoch/lr": 2.0}\n"text"\n')
  assert report.Logs(tmp_path).epoch_series('epoch/lr')[1][0] == 1.0


def test_pool_lineage(tmp_path):
  records = report._stage_records(_fake_search(tmp_path))
  column, links, active = report._lineage(records, 'normal')
  assert {c for c, col in column.items() if col == 0} == {
      'pool(max,3)', 'pool(avg,3)', 'skip', 'conv(k=3,d=1,mul=[])'}
  created = sum(len(r['events']['normal']['created']) for r in records)
  assert sum(links.values()) == created and max(column.values()) == 2
  assert active and active <= set(column)


def test_unfinished_search(tmp_path, check_picture):
  _fake_search(tmp_path, stages=1)
  paths = report.draw_run(tmp_path, tmp_path / 'out', 'svg')
  assert [p.name for p in paths] == ['report.svg', 'pool.svg']
  for path in paths:
    check_picture(path)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'prnas_jax.report', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_command_line(tmp_path, check_picture):
  _fake_search(tmp_path)
  out = _cli(tmp_path, '--out', tmp_path / 'pdf', '--format', 'pdf')
  assert out.returncode == 0, out.stderr
  for name in ('report', 'pool', 'cell_normal', 'cell_reduce'):
    check_picture(tmp_path / 'pdf' / f'{name}.pdf')


def test_bad_workdirs_are_one_line(tmp_path):
  (_fake_search(tmp_path / 'run') / 'stages' / 'stage1.json').write_text('{"stage": 1,')
  with pytest.raises(UserError, match=r'stage1.json is not a stage record \(Expecting'):
    report.draw_run(tmp_path / 'run')
  with pytest.raises(UserError, match='has no scalars.jsonl: pass the --workdir of a search'):
    report.Logs(tmp_path)
  (tmp_path / 'scalars.jsonl').write_text('')
  with pytest.raises(UserError, match='holds no stage yet: draw again once the search'):
    report.Logs(tmp_path)
  out = _cli(tmp_path / 'missing')
  assert out.returncode != 0
  assert out.stderr.strip() == (f'error: workdir {tmp_path / "missing"} does not exist: pass the '
                                '--workdir of a search')
