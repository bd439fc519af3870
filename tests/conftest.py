"""Test-wide settings: CPU only, full-precision float32 matmuls, and XLA's fast-compile mode
(compile time dominates tiny test networks; tests that need fast steps turn it back on)."""
import os
import subprocess
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
jax.config.update('jax_disable_most_optimizations', True)


@pytest.fixture
def optimized_xla():
  """Full XLA optimisation for the duration of a test."""
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', True)


CIFAR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


@pytest.fixture(scope='session')
def cifar_subset(tmp_path_factory):
  """300 training and 100 test images per class from the shared CIFAR-10 copy."""
  if not CIFAR.exists():
    pytest.skip(f'{CIFAR} is missing')
  dest = tmp_path_factory.mktemp('cifar10')
  subprocess.run(['tar', '-xzf', str(CIFAR), '-C', str(dest), '--wildcards',
                  'train/*/0[0-2]??.jpg', 'test/*/00??.jpg'], check=True)
  return dest
