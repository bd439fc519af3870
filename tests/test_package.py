"""The installable package: pyproject.toml pins what requirements.txt pins, the accelerator
extras match the pinned jax, and every console script calls its entry module's ``main``."""
import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
SCRIPTS = {'prnas-search': 'search', 'prnas-train': 'train', 'prnas-visualize': 'visualize',
           'prnas-report': 'report'}


def test_requirements_are_the_dependencies_and_the_test_extra():
  lines = (ROOT / 'requirements.txt').read_text().splitlines()
  extras = PROJECT['optional-dependencies']
  assert lines == PROJECT['dependencies'] + extras['test']
  assert all(re.fullmatch(r'[\w-]+==[\d.]+', line) for line in lines), lines


def test_accelerator_extras_pin_the_jax_of_the_dependencies():
  pins = dict(line.split('==') for line in PROJECT['dependencies'])
  assert pins['jax'] == pins['jaxlib']
  extras = PROJECT['optional-dependencies']
  assert extras['cuda'] == [f'jax[cuda12]=={pins["jax"]}']
  assert extras['tpu'] == [f'jax[tpu]=={pins["jax"]}']


def test_console_scripts_run_the_entry_modules(tmp_path):
  assert PROJECT['scripts'] == {s: f'prnas_jax.{m}:main' for s, m in SCRIPTS.items()}
  for module in SCRIPTS.values():
    assert callable(importlib.import_module(f'prnas_jax.{module}').main)
  # What an installed script does, from a folder outside the repository.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  out = subprocess.run([sys.executable, '-c', 'from prnas_jax.visualize import main; main()',
                        'DL2', '--out', str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [str(tmp_path / 'DL2_normal.png'), str(tmp_path / 'DL2_reduce.png')]
