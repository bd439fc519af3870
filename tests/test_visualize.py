"""Cell pictures: every registry cell renders readably, in every format, from the command line
too, and bad input is one line."""
import itertools
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from prnas_jax import genotype, visualize

ROOT = Path(__file__).resolve().parents[1]


def _overlaps(a, b):
  return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize('name', list(genotype.REGISTRY))
def test_registry_cells_render(name, tmp_path, check_picture):
  geno = genotype.REGISTRY[name]
  paths = visualize.draw_cells(geno, tmp_path, prefix=name, name=name)
  assert [p.name for p in paths] == [f'{name}_normal.png', f'{name}_reduce.png']
  for path in paths:
    check_picture(path, min_size=(800, 300))
  for cell in genotype.CELLS:
    fig = visualize.draw_cell(geno, cell)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_fontsize() == 9]
    assert sorted(t.get_text() for t in labels) == sorted(s.label for s, _ in getattr(geno, cell))
    boxes = [t.get_window_extent(renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
      assert not _overlaps(a, b), f'{name} {cell}: labels overlap'
    kinds = Counter(type(p) for p in ax.patches)
    assert kinds[FancyBboxPatch] == geno.nodes(cell) + 3
    assert kinds[FancyArrowPatch] == len(labels) + len(getattr(geno, f'{cell}_concat'))


@pytest.mark.parametrize('fmt', ['pdf', 'svg'])
def test_formats(fmt, tmp_path, check_picture):
  for path in visualize.draw_cells(genotype.DL2, tmp_path, fmt):
    assert path.suffix == f'.{fmt}'
    check_picture(path)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'prnas_jax.visualize', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_command_line(tmp_path, check_picture):
  out = _cli('dl2', '--out', tmp_path)
  assert out.returncode == 0, out.stderr
  check_picture(tmp_path / 'DL2_normal.png')
  check_picture(tmp_path / 'DL2_reduce.png')
  genotype.save(genotype.DARTS_V2, tmp_path / 'mine.json')
  out = _cli(tmp_path / 'mine.json', '--out', tmp_path / 'pics', '--format', 'svg')
  assert out.returncode == 0, out.stderr
  check_picture(tmp_path / 'pics' / 'mine_reduce.svg')


@pytest.mark.parametrize('args, message', [
    (('DL3',), "error: genotype 'DL3' is not a registry name and does not exist: use one of DL1,"),
    (('DL2', '--format', 'gif'), 'error: flag --format=gif: value should be one of <png|pdf|svg>'),
    ((), 'error: expected GENOTYPE, got none: see --help'),
    (('DL1', 'DL2'), "error: expected GENOTYPE, got ['DL1', 'DL2']: see --help"),
])
def test_bad_input_is_one_line(args, message):
  out = _cli(*args)
  assert out.returncode != 0
  assert out.stderr.strip().startswith(message), out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
