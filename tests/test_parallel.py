"""Data parallelism and multi-process runs, in fresh processes (the device count is fixed when JAX
starts): a search step and a retraining step on 8 fake CPU devices equal the 1-device steps; a
batch that does not divide among the devices is refused in one line; two local processes run a
tiny search and end with the same genotype, which only process 0 writes."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(devices=1):
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': flags,
          'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}


@pytest.fixture(scope='module')
def eight_devices():
  out = subprocess.run([sys.executable, str(ROOT / 'tests' / 'parallel_steps.py')], cwd=ROOT,
                       env=_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.splitlines()[-1])
  print(result)
  return result


@pytest.mark.parametrize('step', ['search', 'train', 'train_pieces'])
def test_eight_devices_step_equals_one_device_step(eight_devices, step):
  r = eight_devices
  assert r['devices'] == 8
  np.testing.assert_allclose(r[f'{step}_loss_n'], r[f'{step}_loss_1'], rtol=1e-5)
  assert r[f'{step}_max_state_diff'] < 1e-5  # every leaf of the state after the step
  assert r[f'{step}_replicated'] and r[f'{step}_batch_sharded']
  assert r[f'{step}_images_per_s_n'] > 0


def test_several_cpu_devices_run_each_program_to_completion(eight_devices):
  """Asynchronous dispatch of a piece chain can deadlock XLA:CPU's devices (pieces.py)."""
  assert eight_devices['hook'] == 'call_to_completion'


def test_a_batch_that_does_not_divide_is_refused(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'prnas_jax.search', '--config', 'configs/tiny.py',
                        '--workdir', str(tmp_path), '--config.search.batch_size=36'], cwd=ROOT,
                       env=_env(8), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      'error: search.batch_size 36 does not divide among the 8 devices: use a multiple of 8, '
      'e.g. --config.search.batch_size=32')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_search_to_the_same_genotype(cifar_subset, tmp_path):
  """One stage of 4 steps of 8 + 8 images; both processes use one workdir (hosts sharing a disk,
  as orbax's collective checkpoints need) and log their genotype."""
  stage = {'epochs': '(1,)', 'grace_epochs': '(0,)', 'keep': '(1,)', 'new': '(0,)',
           'add_layers': '(0,)', 'add_width': '(0,)', 'skip_dropout': '(0.0,)'}
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'prnas_jax.search', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'run'), '--coordinator', f'localhost:{port}',
       '--num_processes', '2', '--process_id', str(i), '--config.data.dataset=folder',
       f'--config.data.folder={cifar_subset}', '--config.data.max_train=128',
       '--config.search.batch_size=16', '--config.search.init_channels=4',
       *(f'--config.search.stages.{k}={v}' for k, v in stage.items())],
      cwd=ROOT, env={**_env(), 'XDG_CACHE_HOME': str(tmp_path / f'cache{i}')},  # own host
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=420)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i}:\n{log[-3000:]}'
  logged = [re.search(rf'\[{i}/2\] genotype: (\{{.*?\n\}})', log, re.S).group(1)
            for i, log in enumerate(logs)]
  assert logged[0] == logged[1] == (tmp_path / 'run' / 'genotype.json').read_text().strip()
  assert (tmp_path / 'run' / 'report.png').is_file()
  assert len((tmp_path / 'run' / 'scalars.jsonl').read_text().splitlines()) > 0
