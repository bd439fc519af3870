"""Bad input: every row of docs/errors.md is produced here and compared with the line the table
shows (``DIR`` stands for the test's temporary folder, ``...`` for any text). Entry-point rows run
``python -m prnas_jax.search`` (or ``train``) and check that the error is its only stderr line."""
import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from prnas_jax import (autobatch, checkpoint, cifar, cli, data, genotype, ops, parallel, report,
                       search, train, visualize)
from prnas_jax.config import search_config, train_config, validate
from prnas_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / 'docs' / 'errors.md'


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))  # never the real ~/.cache


def _search(tmp, *overrides, config=('--config', 'configs/tiny.py'), module='search'):
  """The stderr line of a failing search (or ``module``) run with ``overrides`` of
  configs/tiny.py (never downloading): the only one, but for the line saying what a
  multi-process run waits for."""
  offline = ['--config.data.download=false'] if config and config[-1].startswith('configs/') else []
  cmd = [sys.executable, '-m', f'prnas_jax.{module}', *config, '--workdir', str(tmp / 'run'),
         *offline, *overrides]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XDG_CACHE_HOME': str(tmp / 'xdg')}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  lines = [line for line in out.stderr.strip().splitlines()
           if not line.startswith('joining a multi-process run')]
  assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith('error:'), out.stderr
  return lines[0]


def _config_file(tmp, text):
  """``_search`` with the config file ``text``."""
  path = tmp / 'config.py'
  path.write_text(text)
  return _search(tmp, config=('--config', str(path)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _held(tmp, config, recorded=True):
  """``tmp/run`` holding a run of ``config``: config.json and one checkpoint (recording
  ``config`` if ``recorded``, as checkpoints written before configs were recorded do not)."""
  workdir = tmp / 'run'
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', 2,
                                       cli.plain(config) if recorded else None)
  checkpoints.save(0, {'x': np.zeros(2, np.float32)}, {'epoch': 0})
  checkpoints.close()
  (workdir / 'config.json').write_text(json.dumps(cli.plain(config)))
  return workdir


def _claim(tmp, edit, recorded=True, **changes):
  """``check_claim`` of a search config with ``changes``, in a workdir of the default config
  after ``edit(workdir)``."""
  workdir = _held(tmp, search_config(), recorded)
  edit(workdir)
  return _raises(cli.check_claim, workdir, _with(**changes), False)


def _overwrite_bad_folder(tmp):
  """``--overwrite`` of a run with a data folder that does not exist removes nothing."""
  config = search_config()
  workdir = _held(tmp, config)
  (workdir / 'scalars.jsonl').write_text('{"step": 0}\n')
  before = sorted(p.relative_to(workdir) for p in workdir.rglob('*'))
  config.data.dataset, config.data.folder = 'folder', str(tmp / 'missing')
  line = _raises(search.run, config, workdir, True)
  assert sorted(p.relative_to(workdir) for p in workdir.rglob('*')) == before
  return line


def _no_intact_checkpoint(tmp):
  workdir = _held(tmp, search_config())
  (workdir / 'checkpoints' / '0' / 'record' / 'metadata').write_text('')
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', 2)
  return _raises(checkpoints.restore_newest, lambda record: None)


def _one_class(tmp):
  _images(tmp, [(8, 8)])
  return _load_folder(tmp)


def _float_image(tmp):
  Image.new('F', (8, 8), 0.5).save(_images(tmp) / 'train' / 'a' / 'f.tif')
  return _load_folder(tmp)


def _train_config(tmp, edit=None, **model):
  """A 3-cell retraining config on CIFAR-10 with the DARTS_V2 genotype after ``edit(obj)``
  written to ``tmp/g.json``."""
  config = train_config()
  config.model.update(model)
  if edit:
    obj = genotype.load('DARTS_V2').to_json()
    edit(obj)
    (tmp / 'g.json').write_text(json.dumps(obj))
    config.genotype = str(tmp / 'g.json')
  return config


def _a_file(tmp):
  (tmp / 'file').write_text('')
  return tmp / 'file'


def _raises(fn, *args):
  """The line an entry point prints for the UserError of ``fn(*args)``."""
  with pytest.raises(UserError) as info:
    fn(*args)
  return f'error: {info.value}'


def _images(root, sizes=((8, 8),) * 8):
  """``root/train/<a|b>/<i>.png``, classes alternating; returns ``root``."""
  for i, size in enumerate(sizes):
    path = root / 'train' / 'ab'[i % 2] / f'{i}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, (30 * i, 60, 90)).save(path)
  return root


def _load_folder(root, mkdir='', broken=''):
  """``load_split`` of ``root`` after making the folder ``root/mkdir`` and writing a file
  ``root/broken`` that is no image."""
  if mkdir:
    (root / mkdir).mkdir(parents=True)
  if broken:
    (root / broken).write_bytes(b'not a png')
  cfg = search_config().data
  cfg.dataset, cfg.folder = 'folder', str(root)
  return _raises(data.load_split, cfg, 'train')


class _Served(io.BytesIO):
  """A download's response (without a Content-Range header)."""
  headers = {}


class _Stalled(_Served):
  """A download whose first read times out."""

  def read(self, n=-1):
    raise TimeoutError('The read operation timed out')


def _cifar10(tmp, opener=None, placed=b'', size=None):
  """``load_split`` of cifar10 without a tfds copy, downloading through ``opener`` (request ->
  response), after placing the bytes ``placed`` (if any) where the archive goes; ``size``
  replaces the official archive's size."""
  cfg = search_config().data
  cfg.tfds_data_dir = str(tmp / 'tfds')
  if placed:
    path = data.user_cache_dir() / 'downloads' / 'cifar-10-binary.tar.gz'
    path.parent.mkdir(parents=True)
    path.write_bytes(placed)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cifar, 'urlopen', lambda request, timeout: opener(request))
    if size:
      patch.setitem(cifar.ARCHIVES, 'cifar10', dataclasses.replace(
          cifar.ARCHIVES['cifar10'], size=size))
    return _raises(data.load_split, cfg, 'train')


def _offline(request):
  raise urllib.error.URLError(socket.gaierror(-2, 'Name or service not known'))


def _genotype(tmp, edit):
  """``genotype.load`` of DARTS_V1 in DARTS names after ``edit(obj)``, written as JSON (or the
  text ``edit`` returns, if a string)."""
  obj = genotype.load('DARTS_V1').to_darts()
  text = edit(obj)
  path = tmp / 'g.json'
  path.write_text(text if isinstance(text, str) else json.dumps(obj))
  return _raises(genotype.load, str(path))


def _replace(cell, n, entry):
  """An edit for ``_genotype``: entry ``n`` of ``cell`` becomes ``entry``."""
  def edit(obj):
    obj[cell][n] = entry
  return edit


@contextlib.contextmanager
def _skip_only(tmp, lr: float):
  """The config of a one-stage search on 16 images of 8x8 with ``search.lr`` = ``lr``: one
  compile, kept short by a start set of one candidate (skip) per edge."""
  config = search_config()
  config.data.dataset, config.data.folder = 'folder', str(_images(tmp / 'ds', [(8, 8)] * 16))
  s = config.search
  s.layers, s.init_channels, s.batch_size, s.valid_epochs, s.lr = 3, 2, 2, 0, lr
  s.stages.epochs, s.stages.grace_epochs, s.stages.keep, s.stages.new = (1,), (0,), (1,), (0,)
  s.stages.add_layers, s.stages.add_width, s.stages.skip_dropout = (0,), (0,), (0.0,)
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(ops.START_SETS, 'skip', (ops.Skip(),))
    s.start = 'skip'
    yield config


def _assert_stage_start_is_latest(workdir):
  """The newest readable checkpoint of ``workdir`` is the first one: stage 0's start."""
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', 2)
  assert checkpoints.latest() == 0
  tree, record = checkpoints.restore(0, None)
  checkpoints.close()
  assert (record['stage'], record['epoch']) == (0, 0) and any('alphas' in p for p in tree)


def _diverge(tmp):
  """``search.lr`` = 1e30: the loss of the first epoch is not finite; its start's checkpoint
  stays."""
  with _skip_only(tmp, 1e30) as config:
    line = _raises(search.run, config, tmp / 'run')
  _assert_stage_start_is_latest(tmp / 'run')
  return line


def _disk_full(tmp):
  """The disk is full when checkpoint 1 (after the first epoch) is written; checkpoint 0 stays
  the newest, and once there is space the same run resumes from it and finishes."""
  def full(manager, step, *args, **kwargs):
    if step > 0:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(manager, step, *args, **kwargs)

  save = ocp.CheckpointManager.save
  with _skip_only(tmp, 0.025) as config:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(ocp.CheckpointManager, 'save', full)
      line = _raises(search.run, config, tmp / 'run')
    _assert_stage_start_is_latest(tmp / 'run')
    search.run(config, tmp / 'run')
  assert 'resuming from checkpoint 0 (stage 0, epoch 0)' in (tmp / 'run' / 'log.txt').read_text()
  assert (tmp / 'run' / 'genotype.json').exists()
  return line


def _on_devices(n, fn, *args):
  """``_raises(fn, *args)`` as if JAX saw ``n`` devices."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(parallel.jax, 'device_count', lambda: n)
    return _raises(fn, *args)


def _bad_stage_record(tmp):
  """``report`` of a workdir whose stage 0 has started and whose stage record is cut short."""
  (tmp / 'stages').mkdir()
  (tmp / 'stages' / 'stage0.json').write_text('{"stage": 0,')
  (tmp / 'scalars.jsonl').write_text('{"step": 0, "stage/epochs": 1}\n')
  return _raises(report.draw_run, tmp, None, 'png')


def _too_wide(tmp):
  """A conv 99999 times as wide as its cell, on a device of 1 GiB."""
  config = _train_config(tmp, _replace('normal', 0, ['conv(k=3,d=1,mul=[99999])', 0]), layers=3)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(autobatch, 'device_memory', lambda: 2**30)
    return _raises(train.count_params, config)


def _scanned_on_a_gpu(tmp):
  """Scanned cells asked for where the backend is a GPU."""
  config = _train_config(tmp, layers=3)
  config.model.scan_cells = True
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, 'default_backend', lambda: 'gpu')
    return _raises(train.count_params, config)


ROWS = {
    'config file missing': lambda t: _search(t, config=('--config', 'configs/tiyn.py')),
    'no config file': lambda t: _search(t, config=()),
    'misspelled config key': lambda t: _search(t, '--config.search.lyers=3'),
    'wrong type (integer)': lambda t: _search(t, '--config.search.layers=abc'),
    'wrong type (number)': lambda t: _search(t, '--config.search.lr=fast'),
    'wrong type (true or false)': lambda t: _search(t, '--config.search.keep_morphable=maybe'),
    'wrong type (stage list)': lambda t: _search(t, "--config.search.stages.keep=(4, 2.5, 1)"),
    'stage lists of different lengths': lambda t: _search(t, '--config.search.stages.keep=(4, 1)'),
    'keep < new': lambda t: _search(t, '--config.search.stages.keep=(1, 3, 1)'),
    'unknown start set': lambda t: _search(t, '--config.search.start=prdarts6'),
    'unknown preset': lambda t: _search(t, '--config.search.preset=dartslike'),
    'genotype file missing': lambda t: _raises(genotype.load, str(t / 'nope.json')),
    'genotype not JSON': lambda t: _genotype(t, lambda g: '{"normal": ['),
    'genotype of the wrong shape': lambda t: _genotype(t, lambda g: g.pop('reduce')),
    'genotype entry of the wrong shape': lambda t: _genotype(
        t, _replace('normal', 0, ['sep_conv_3x3'])),
    'unknown op (candidate name)': lambda t: _genotype(
        t, _replace('normal', 0, ['sep_conv_3x5', 0])),
    'a node without two inputs': lambda t: _genotype(t, lambda g: g['normal'].pop()),
    'an input that does not exist': lambda t: _genotype(
        t, _replace('reduce', 0, ['max_pool_3x3', 3])),
    'data folder missing': lambda t: _search(
        t, '--config.data.dataset=folder', f'--config.data.folder={t}/missing'),
    'data folder without the split': lambda t: _load_folder(t),
    'split without class folders': lambda t: _load_folder(t, mkdir='train'),
    'class folders without images': lambda t: _load_folder(t, mkdir='train/a'),
    'mixed image sizes': lambda t: _load_folder(_images(t, [(8, 8), (8, 8), (9, 8), (8, 8)])),
    'unreadable image': lambda t: _load_folder(_images(t), broken='train/a/broken.png'),
    'CIFAR neither prepared nor downloaded, download off': lambda t: _search(
        t, f'--config.data.tfds_data_dir={t}/tfds'),
    'CIFAR download without internet': lambda t: _cifar10(t, _offline),
    'CIFAR download interrupted': lambda t: _cifar10(t, lambda request: _Stalled()),
    'CIFAR download not the official archive': lambda t: _cifar10(
        t, lambda request: _Served(b'<html>' * 1000), size=6000),
    'CIFAR archive copied by hand is not the official one': lambda t: _cifar10(
        t, placed=b'\x1f\x8b not really the archive'),
    'ImageNet not prepared': lambda t: _raises(data.tfds_source, 'imagenet2012', 'train',
                                               f'{t}/tfds'),
    'batch larger than the split': lambda t: _search(
        t, '--config.data.dataset=folder', f'--config.data.folder={_images(t / "ds")}'),
    'NaN or inf loss': _diverge,
    'batch that does not divide among the devices': lambda t: _on_devices(
        8, parallel.check_batch, 36, 'search.batch_size'),
    'multi-process run outside a cluster': lambda t: _search(t, '--distributed'),
    'no checkpoint kept': lambda t: _search(t, '--config.search.checkpoints_kept=0'),
    'unknown program layout': lambda t: _raises(validate, _with(programs='cells')),
    'unknown alpha pullback': lambda t: _raises(validate, _with(alpha_pullback='weights')),
    'automatic batch with a bad cap': lambda t: _raises(
        validate, _with(batch_size=0, max_batch_size=4)),
    'automatic batch that cannot fit': lambda t: _raises(
        autobatch.fit_batch_size, lambda b: 3 * 2**30, 2**30, 8, 128),
    'disk full while writing a checkpoint': _disk_full,
    'workdir that is a file': lambda t: _raises(search.run, search_config(), _a_file(t)),
    'workdir under a file': lambda t: _raises(search.run, search_config(), _a_file(t) / 'run'),
    'negative seed': lambda t: _raises(validate, _with_seed(-1)),
    'a number that is not finite': lambda t: _search(t, '--config.search.lr=nan'),
    'config file with a syntax error': lambda t: _config_file(t, 'def get_config(:\n'),
    'config file whose get_config raises': lambda t: _config_file(
        t, 'def get_config():\n  return 1 / 0\n'),
    'config file without get_config': lambda t: _config_file(t, 'CONFIG = {}\n'),
    'get_config that returns no config': lambda t: _config_file(
        t, 'def get_config():\n  return 5\n'),
    'retraining config given to the search': lambda t: _search(
        t, config=('--config', 'configs/train_cifar.py')),
    'search config given to the retraining': lambda t: _search(t, module='train'),
    'keep more than an edge holds': lambda t: _raises(
        search.preflight, _with(stages=dict(keep=(10, 6, 6, 6, 6, 4, 3, 2, 1))), t / 'run', False),
    'unknown depthwise form': lambda t: _raises(
        search.preflight, _with(dw_form='shifted'), t / 'run', False),
    'a multi-process run that never forms': lambda t: _search(
        t, '--coordinator', f'localhost:{_free_port()}', '--num_processes', '2',
        '--process_id', '1', '--join_timeout', '2'),
    '--overwrite with a bad data folder': _overwrite_bad_folder,
    'config.json lost, another command': lambda t: _claim(
        t, lambda w: (w / 'config.json').unlink(), init_channels=4),
    'config.json not JSON (checkpoints without their config)': lambda t: _claim(
        t, lambda w: (w / 'config.json').write_text('{"seed": 0,'), recorded=False),
    'config.json lost (checkpoints without their config)': lambda t: _claim(
        t, lambda w: (w / 'config.json').unlink(), recorded=False),
    'no intact checkpoint': _no_intact_checkpoint,
    'one class': _one_class,
    'image without a fixed range': _float_image,
    'genotype op larger than the feature maps': lambda t: _raises(
        train.count_params, _train_config(t, _replace('normal', 0, ['conv(k=99,d=1,mul=[1])', 0]),
                                          layers=3)),
    'genotype too wide to train': _too_wide,
    'unknown retraining program layout': lambda t: _raises(
        train.count_params, _train_config(t, layers=3, programs='cells')),
    'pieces and scanned cells': lambda t: _raises(
        train.count_params, _train_config(t, layers=3, programs='pieces', scan_cells=True)),
    'scanned cells on a GPU': _scanned_on_a_gpu,
    'bad genotype and bad data in train': lambda t: _raises(train.run, _bad_train(t), t / 'run'),
    'visualize --out that is a file': lambda t: _raises(visualize.draw_genotype, 'DL2', _a_file(t), 'png'),
    'report of a file': lambda t: _raises(report.draw_run, _a_file(t), None, 'png'),
    'stage record that is not JSON': _bad_stage_record,
}


def _with_seed(seed):
  config = search_config()
  config.seed = seed
  return config


def _bad_train(tmp):
  """A retraining config whose genotype and data folder both do not exist."""
  config = _train_config(tmp)
  config.genotype = str(tmp / 'nope.json')
  config.data.dataset, config.data.folder = 'folder', str(tmp / 'missing')
  return config


def _with(**search):
  config = search_config()
  stages = search.pop('stages', {})
  config.search.update(search)
  config.search.stages.update(stages)
  return config


def _table() -> dict[str, str]:
  """``{bad input: the line it produces}`` from the table in docs/errors.md."""
  rows = {}
  for line in TABLE.read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split(' | ')]
    if line.startswith('| ') and len(cells) == 3 and cells[2].startswith('`error:'):
      rows[cells[0]] = cells[2].strip('`').strip()
  return rows


def test_every_row_is_in_the_table():
  assert sorted(_table()) == sorted(ROWS)


@pytest.mark.parametrize('row', ROWS)
def test_row(row, tmp_path):
  line = ROWS[row](tmp_path).replace(str(tmp_path), 'DIR')
  assert '\n' not in line
  shown = _table()[row]
  pattern = '.*'.join(re.escape(part) for part in shown.split('...'))
  assert re.fullmatch(pattern, line), f'docs/errors.md shows\n  {shown}\nthe code gives\n  {line}'


def test_no_code_executing_formats():
  """User files are read as JSON, images and .npz without pickles; nothing is eval'd."""
  for path in (ROOT / 'prnas_jax').glob('*.py'):
    text = path.read_text()
    assert not re.search(r'\b(c?pickle|dill|marshal|shelve|joblib|torch|yaml)\b|\b(eval|exec)\(',
                         text), path
    assert not re.search(r'\bnp\.load\((?![^)]*allow_pickle=False)', text), path
