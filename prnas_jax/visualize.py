"""``python -m prnas_jax.visualize GENOTYPE [--out DIR] [--format png|pdf|svg]``: draws the
normal and the reduction cell of a genotype (a registry name or a genotype file) into
``DIR/<NAME>_normal.<format>`` and ``DIR/<NAME>_reduce.<format>``.

Left to right: the inputs c_{k-2} and c_{k-1}, the intermediate nodes, the output c_{k}; one
labelled edge per chosen candidate and an unlabelled edge from every concatenated node to the
output. Edges curve around node boxes, and labels move along their edge, away from each other.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path as MplPath

from prnas_jax import cli, genotype, pictures
from prnas_jax.genotype import Genotype

COLOURS = {'input': 'darkseagreen', 'node': 'lightblue', 'output': 'palegoldenrod'}
TITLES = {'normal': 'normal cell', 'reduce': 'reduction cell'}
_BOX = np.array([0.8, 0.42])  # node box width and height; one data unit is one inch
_STEP = 2.7  # horizontal distance between node columns
_RADS = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45)
_FRACTIONS = (0.5, 0.4, 0.6, 0.3, 0.7)
_SAMPLES = np.linspace(0, 1, 201)
_MARGIN = np.array([-0.15, -0.15, 0.15, 0.15])  # keeps crossings clear of a label
# edge and label colours, one per labelled edge: a label is told from its edge where edges cross
_EDGE_COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown',
                 'tab:pink', 'tab:cyan', 'tab:olive', 'black')


def _centres(nodes: int) -> dict[int, np.ndarray]:
  """Node id -> centre: 0 and 1 the inputs, i + 2 node i (zigzag), nodes + 2 the output."""
  out = {0: (0.0, 1.1), 1: (0.0, -1.1)}
  out |= {i + 2: ((i + 1) * _STEP, 0.7 if i % 2 == 0 else -0.7) for i in range(nodes)}
  out[nodes + 2] = ((nodes + 1) * _STEP, 0.0)
  return {n: np.array(c) for n, c in out.items()}


def _control(a, b, rad) -> np.ndarray:
  """The control point of matplotlib's ``arc3,rad=rad`` curve (a quadratic Bezier) from a to b."""
  d = b - a
  return (a + b) / 2 + rad * np.array([d[1], -d[0]])


def _curve(a, b, rad, t=_SAMPLES) -> np.ndarray:
  """Points at fractions ``t`` of the ``arc3,rad=rad`` curve from ``a`` to ``b``."""
  t = np.asarray(t)[:, None]
  return (1 - t) ** 2 * a + 2 * (1 - t) * t * _control(a, b, rad) + t ** 2 * b


def _arrow_path(a, b, rad) -> MplPath:
  """The ``arc3`` curve between the boxes centred at ``a`` and ``b``, cut at the boxes' borders
  (cheaper to draw than clipping to patches)."""
  points = _curve(a, b, rad)
  inside = [np.all(np.abs(points - c) <= _BOX / 2, axis=1) for c in (a, b)]
  t0, t1 = _SAMPLES[~(inside[0] | inside[1])][[0, -1]]
  c = _control(a, b, rad)
  middle = (1 - t0) * (1 - t1) * a + ((1 - t0) * t1 + t0 * (1 - t1)) * c + t0 * t1 * b
  start, end = _curve(a, b, rad, [t0, t1])
  return MplPath([start, middle, end], [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])


def _rect(centre, size) -> np.ndarray:
  return np.concatenate([centre - size / 2, centre + size / 2])


def _hits(points, rect) -> int:
  return int(np.all((points >= rect[:2]) & (points <= rect[2:]), axis=1).sum())


def _overlap(a, b) -> float:
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(w, 0) * max(h, 0)


class _Router:
  """Picks each edge's curvature and each label's spot, cheapest first: an edge through another
  node box costs most, then labels over labels or boxes, then edges under labels."""

  def __init__(self, centres):
    self.centres = centres
    self.boxes = {n: _rect(c, _BOX + 0.15) for n, c in centres.items()}
    self.labels, self.curves, self.used = [], [], Counter()

  def place(self, src: int, dst: int, size=None) -> tuple[float, np.ndarray | None]:
    """(rad, label rectangle or None) for an edge, recorded for the edges placed after it."""
    best = None
    for rad in _RADS:
      points = _curve(self.centres[src], self.centres[dst], rad)
      cost = (10 * sum(_hits(points, box) > 0 for n, box in self.boxes.items()
                       if n not in (src, dst))
              + 5 * self.used[src, dst, rad] + 0.3 * sum(_hits(points, r) for r in self.labels)
              + abs(rad))
      spots = [None] if size is None else [
          _rect(c, size) for c in _curve(self.centres[src], self.centres[dst], rad, _FRACTIONS)]
      for n, rect in enumerate(spots):
        extra = 0.0 if rect is None else (
            20 * sum(_overlap(rect, r) for r in [*self.labels, *self.boxes.values()])
            / (size[0] * size[1]) + 0.3 * sum(_hits(c, rect + _MARGIN) for c in self.curves)
            + 0.1 * n)
        if best is None or cost + extra < best[0]:
          best = (cost + extra, rad, rect, points)
    _, rad, rect, points = best
    self.used[src, dst, rad] += 1
    self.curves.append(points)
    if rect is not None:
      self.labels.append(rect)
    return rad, rect


def draw_cell(geno: Genotype, cell: str, title: str = ''):
  """The figure of one cell type (``'normal'`` or ``'reduce'``) of ``geno``."""
  nodes = geno.nodes(cell)
  centres = _centres(nodes)
  fig = pictures.figure(1, 1)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_axis_off()
  names = {0: '$c_{k-2}$', 1: '$c_{k-1}$', nodes + 2: '$c_{k}$'}
  for n, centre in centres.items():
    kind = 'input' if n < 2 else 'output' if n == nodes + 2 else 'node'
    ax.add_patch(FancyBboxPatch(tuple(centre - _BOX / 2), *_BOX, boxstyle='round,pad=0.02',
                                fc=COLOURS[kind], ec='black', lw=1, zorder=3))
    ax.text(*centre, names.get(n, str(n - 2)), ha='center', va='center', fontsize=12, zorder=4)

  renderer = fig.canvas.get_renderer()
  router = _Router(centres)
  entries = getattr(geno, cell)
  edges = [(i, n // 2 + 2, spec.label, _EDGE_COLOURS[n % len(_EDGE_COLOURS)])
           for n, (spec, i) in enumerate(entries)]
  edges += [(c, nodes + 2, None, 'grey') for c in getattr(geno, f'{cell}_concat')]
  for src, dst, label, colour in edges:
    size = None
    if label is not None:
      text = ax.text(0, 0, label, ha='center', va='center', fontsize=9, zorder=5, color=colour,
                     bbox=dict(boxstyle='round,pad=0.15', fc='white', ec='none', alpha=0.9))
      extent = text.get_window_extent(renderer)
      size = np.array([extent.width, extent.height]) / fig.dpi + 0.1
    rad, rect = router.place(src, dst, size)
    if rect is not None:
      text.set_position((rect[:2] + rect[2:]) / 2)
    ax.add_artist(FancyArrowPatch(path=_arrow_path(centres[src], centres[dst], rad),
                                  arrowstyle='-|>', mutation_scale=12, color=colour, lw=1.2,
                                  zorder=2))

  rects = [*router.boxes.values(), *router.labels]
  points = np.concatenate([*router.curves, *(r.reshape(2, 2) for r in rects)])
  low, high = points.min(axis=0) - 0.2, points.max(axis=0) + 0.2
  if title:
    ax.text(low[0], high[1], title, ha='left', va='bottom', fontsize=12)
    high[1] += 0.4
  ax.set_xlim(low[0], high[0])
  ax.set_ylim(low[1], high[1])
  fig.set_size_inches(*(high - low))
  return fig


def draw_cells(geno: Genotype, out_dir: Path, fmt: str = 'png', prefix: str = 'cell',
               name: str = '') -> list[Path]:
  """Writes ``out_dir/<prefix>_normal.<fmt>`` and ``..._reduce.<fmt>``; returns their paths."""
  return [pictures.save(draw_cell(geno, cell, f'{name} {TITLES[cell]}'.strip()),
                        Path(out_dir) / f'{prefix}_{cell}.{fmt}') for cell in genotype.CELLS]


def draw_genotype(name: str, out_dir, fmt: str) -> list[Path]:
  """Pictures of the cells of the genotype ``name`` (registry name or file) in ``out_dir``,
  named after it; returns their paths."""
  folder = cli.check_folder(out_dir, '--out')
  geno = genotype.load(name)
  registry = {n.lower(): n for n in genotype.REGISTRY}
  stem = registry.get(name.lower(), Path(name).stem)
  return draw_cells(geno, folder, fmt, prefix=stem, name=stem)


def main() -> None:
  """``prnas-visualize GENOTYPE`` and ``python -m prnas_jax.visualize GENOTYPE``."""
  out, fmt = cli.picture_flags('Folder for the pictures.', default_out='.')

  def draw(name):
    for path in draw_genotype(name, out.value, fmt.value):
      print(path)
  cli.run(draw, args=('GENOTYPE',))


if __name__ == '__main__':
  main()
