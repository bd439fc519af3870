"""What the picture modules share: matplotlib figures on the Agg canvas (no display, no global
pyplot state), the file formats, and atomic saving."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prnas_jax import files

FORMATS = ('png', 'pdf', 'svg')
DPI = 120


def figure(width: float, height: float) -> Figure:
  """A figure of ``width`` x ``height`` inches on an Agg canvas."""
  fig = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: Path) -> Path:
  """Writes ``fig`` to ``path`` atomically, in the format its suffix names."""
  with files.atomic_open(path, 'wb') as f:
    fig.savefig(f, format=Path(path).suffix[1:], dpi=DPI, bbox_inches='tight',
                facecolor='white')
  return Path(path)
