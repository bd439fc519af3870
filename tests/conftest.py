"""Test-wide settings: CPU only, the entry points' process settings (XLA flags, malloc),
full-precision float32 matmuls, XLA's fast-compile mode (compile time dominates tiny test
networks; tests that need fast steps turn it back on), no persistent compilation cache
in-process, each module's programs released after it, no downloads, and a check that a written
picture is plausible."""
import gc
import os
import subprocess
from pathlib import Path
from xml.etree import ElementTree

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from prnas_jax import cifar, cli, search_step  # noqa: E402

cli.prepare_process()  # before JAX starts its backends, as the entry points do
jax.config.update('jax_default_matmul_precision', 'highest')
jax.config.update('jax_disable_most_optimizations', True)
# No persistent compilation cache in this process (the runs' subprocesses keep theirs): it wrote
# every executable of the suite, and the suite took 1,019-1,202 s with it, 870-894 s without.
jax.config.update('jax_enable_compilation_cache', False)


@pytest.fixture(scope='module', autouse=True)
def _release_programs():
  """Frees the programs a test module compiled once it ends (``search_step.release_programs``):
  the whole suite in one process reached the memory mappings a process may hold in
  ``test_supernet.py``, and XLA's compiler segfaulted."""
  yield
  search_step.release_programs()
  gc.collect()


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
  """No test reaches the network: the CIFAR download refuses every URL (tests that serve an
  archive of their own replace it)."""
  def refuse(request, timeout):
    raise AssertionError(f'a test tried to download {request.full_url}')
  monkeypatch.setattr(cifar, 'urlopen', refuse)


@pytest.fixture
def optimized_xla():
  """Full XLA optimisation for the duration of a test."""
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', True)


def _check_picture(path, min_size=(300, 200)):
  """Asserts that ``path`` is a plausible picture in the format its suffix names: a PNG of at
  least ``min_size`` pixels with several colours, a PDF, or an SVG document."""
  assert path.is_file(), path
  data = path.read_bytes()
  if path.suffix == '.png':
    with Image.open(path) as image:
      assert image.format == 'PNG'
      assert image.width >= min_size[0] and image.height >= min_size[1], image.size
      colours = image.convert('RGB').getcolors(maxcolors=1 << 20)
    assert len(colours) >= 5, f'{path} is nearly blank'
  elif path.suffix == '.pdf':
    assert data.startswith(b'%PDF') and len(data) > 2000
  else:
    root = ElementTree.fromstring(data)
    assert root.tag.endswith('svg') and len(list(root.iter())) > 20


@pytest.fixture
def check_picture():
  return _check_picture


CIFAR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


def extract_cifar(dest, *patterns):
  """The images of the shared CIFAR-10 copy matching ``patterns`` under ``dest`` (the test is
  skipped if the copy is missing); returns ``dest``."""
  if not CIFAR.exists():
    pytest.skip(f'{CIFAR} is missing')
  subprocess.run(['tar', '-xzf', str(CIFAR), '-C', str(dest), '--wildcards', *patterns],
                 check=True)
  return dest


@pytest.fixture(scope='session')
def cifar_subset(tmp_path_factory):
  """300 training and 100 test images per class from the shared CIFAR-10 copy."""
  return extract_cifar(tmp_path_factory.mktemp('cifar10'), 'train/*/0[0-2]??.jpg',
                       'test/*/00??.jpg')
