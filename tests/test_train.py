"""Retraining: the published cells' parameter counts, genotype files in both namings, the
schedules, and a tiny network trained on real CIFAR-10 that learns and resumes exactly after a
SIGKILL."""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from prnas_jax import checkpoint, genotype, network, train
from prnas_jax.config import train_config
from prnas_jax.ops import Pool, Skip
from prnas_jax.cells import CellLayout

ROOT = Path(__file__).resolve().parents[1]


def _config(name='train_cifar'):
  return runpy.run_path(str(ROOT / 'configs' / f'{name}.py'))['get_config']()


@pytest.mark.parametrize('name,millions', [('DL1', 3.2), ('DL2', 4.0), ('DR', 4.2), ('UR', 5.4),
                                           ('DARTS_V2', 3.3), ('PDARTS', 3.4)])
def test_registry_parameter_counts(name, millions):
  config = _config()
  config.genotype = name
  assert round(train.count_params(config) / 1e6, 1) == millions


def test_quick_start_config_builds():
  config = _config('train_tiny')  # the README's retraining of the tiny search's genotype
  assert config.genotype == 'runs/tiny/genotype.json'
  config.genotype = 'DL2'
  assert train.count_params(config) == 73306


def test_auxiliary_head_is_left_out_of_the_count():
  net = network.Network(genotype.load('DARTS_V2'), layers=5, channels=8)
  shapes = network.variable_shapes(net, (32, 32, 3))['params']
  aux = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes['aux']))
  assert aux > 0 and network.param_count(shapes) == sum(
      int(np.prod(v.shape)) for v in jax.tree.leaves(shapes)) - aux


def test_darts_names_and_ours_build_the_same_network(tmp_path):
  g = genotype.load('DARTS_V2')
  paths = {}
  for naming, obj in (('darts', g.to_darts()), ('ours', g.to_json())):
    paths[naming] = tmp_path / f'{naming}.json'
    paths[naming].write_text(json.dumps(obj))
  assert 'sep_conv_3x3' in paths['darts'].read_text()
  assert 'conv(k=3,d=1,mul=[1])' in paths['ours'].read_text()
  nets = [network.Network(genotype.load(str(p)), layers=5, channels=8) for p in paths.values()]
  assert nets[0] == nets[1]
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = nets[0].init(jax.random.key(0), x, train=False)
  out = [net.apply(variables, x, train=False)[0] for net in nets]
  np.testing.assert_array_equal(out[0], out[1])


def test_imagenet_network_shapes():
  config = _config('train_imagenet')
  net = train.build_network(config, 1000, (224, 224, 3))
  shapes = network.variable_shapes(net, (224, 224, 3))['params']
  assert 'aux' not in shapes and shapes['head']['kernel'].shape == (4 * 4 * 48, 1000)
  assert shapes['cell0']['pre0']['conv1']['kernel'].shape[-1] == 24  # FactorizedReduce after the stems


def test_schedules():
  c = train_config()
  assert train.learning_rate(c, 0) == 0.025
  assert abs(train.learning_rate(c, 300) - 0.0125) < 1e-12
  imagenet = _config('train_imagenet')
  lrs = [train.learning_rate(imagenet, e) for e in range(250)]
  assert lrs[0] == 0.1 and abs(lrs[244] - 0.1 / 245) < 1e-12
  assert abs(lrs[245] - 0.1 * 5 / (245 * 5)) < 1e-12 and all(np.diff(lrs) <= 0) and lrs[-1] > 0
  c.warmup_epochs = 5
  assert abs(train.learning_rate(c, 0) - 0.005) < 1e-12


def test_drop_path_spares_only_the_identity():
  x = np.random.default_rng(0).normal(size=(64, 8, 8, 4)).astype(np.float32)

  def outputs(entries):
    cell = network.Cell(entries, (2, 3, 4, 5), CellLayout(False, False, 4))
    variables = cell.init(jax.random.key(0), x, x, train=False)
    return [cell.apply(variables, x, x, train=True, drop_rate=rate, mutable=['batch_stats'],
                       rngs={'drop_path': jax.random.key(1)})[0] for rate in (0.0, 0.5)]

  kept, dropped = outputs(((Skip(), 0), (Skip(), 1)) * 4)
  np.testing.assert_array_equal(kept, dropped)
  kept, dropped = outputs(((Skip(), 0), (Pool('max', 3), 1)) * 4)
  zeroed = np.all(dropped == 0, axis=(1, 2, 3))  # a sample whose every pool path was dropped
  assert 0 < zeroed.sum() < 64 or not np.allclose(kept, dropped)
  assert not np.allclose(kept, dropped)


# ------------------------------------------------------------------------------ end to end

TINY = ['--config.model.layers=3', '--config.model.init_channels=8', '--config.batch_size=32',
        '--config.epochs=3', '--config.data.max_train=640', '--config.test_batch_size=250',
        '--config.log_every=5', '--config.data.dataset=folder']


def _train(workdir, folder, wait_for=None):
  """Runs the tiny training as a subprocess; with ``wait_for``, SIGKILLs it once that
  checkpoint exists (some way into the next epoch)."""
  cmd = [sys.executable, '-m', 'prnas_jax.train', '--config', 'configs/train_cifar.py',
         '--workdir', str(workdir), *TINY, f'--config.data.folder={folder}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if wait_for is not None:
    target = workdir / 'checkpoints' / str(wait_for)
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    time.sleep(1)  # into the next epoch (an epoch may take only 2 s with a warm XLA cache)
    proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate(timeout=900)
  return proc.returncode, out


@pytest.fixture(scope='module')
def runs(cifar_subset, tmp_path_factory):
  """An uninterrupted tiny training, and one SIGKILLed after its first checkpoint and rerun,
  with the epochs the killed run had finished (its newest checkpoint once it was dead)."""
  full = tmp_path_factory.mktemp('full')
  code, out = _train(full, cifar_subset)
  assert code == 0, out
  killed = tmp_path_factory.mktemp('killed')
  code, out = _train(killed, cifar_subset, wait_for=1)
  assert code == -signal.SIGKILL, out
  done = max(int(p.name) for p in (killed / 'checkpoints').iterdir() if p.name.isdigit())
  code, resumed_log = _train(killed, cifar_subset)
  assert code == 0, resumed_log
  return full, killed, resumed_log, done


def test_tiny_training_learns(runs):
  results = json.loads((runs[0] / 'results.json').read_text())
  assert results['finished'] and results['epochs_done'] == 3
  assert results['final_test_accuracy'] > 0.15  # chance 0.1 +- 0.01 (1000 test images)
  assert results['best_test_accuracy'] >= results['final_test_accuracy']
  assert [h['lr'] for h in results['history']] == [train.learning_rate(_tiny_config(), e)
                                                   for e in range(3)]


def _tiny_config():
  c = train_config()
  c.epochs = 3
  return c


def _final_state(workdir):
  ckpt = checkpoint.Checkpoints(workdir / 'checkpoints', 2)
  step = ckpt.latest()
  state, _ = ckpt.restore(step)
  ckpt.close()
  return step, state


def test_killed_run_resumes_at_the_right_epoch(runs):
  full, killed, log, done = runs
  assert done in (1, 2) and f'resuming after epoch {done}' in log
  a = json.loads((full / 'results.json').read_text())
  b = json.loads((killed / 'results.json').read_text())
  for x, y in zip(a['history'], b['history'], strict=True):
    assert x['epoch'] == y['epoch'] and x['lr'] == y['lr'] and x['drop_path'] == y['drop_path']
    assert x['test_accuracy'] == pytest.approx(y['test_accuracy'], abs=2e-3)
  steps = [int(json.loads(line)['step']) for line in (killed / 'scalars.jsonl').open()]
  assert steps == [0, 1, 2]  # the resumed run logged epochs 1 and 2 once
  (sa, ra), (sb, rb) = _final_state(full), _final_state(killed)
  assert sa == sb == 3 and sorted(p.name for p in (killed / 'checkpoints').iterdir()) == ['2', '3']
  for x, y in zip(jax.tree.leaves(ra), jax.tree.leaves(rb), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_finished_run_is_not_trained_again(runs, cifar_subset):
  code, out = _train(runs[0], cifar_subset)
  assert code == 0 and 'resuming after epoch 3' in out and 'epoch 1/3' not in out
