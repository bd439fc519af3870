"""Test-wide settings: CPU only, full-precision float32 matmuls, and XLA's fast-compile mode
(compile time dominates tiny test networks; tests that need fast steps turn it back on)."""
import os

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
