"""``python -m prnas_jax.report WORKDIR [--out DIR] [--format png|pdf|svg]``: pictures of a search
from its logs (a finished search writes them into its workdir on its own).

``report.<format>``: over epochs, the candidates per edge, new candidates per stage, learning
rate, train and validation accuracy, average op similarity and op-type fractions per cell type,
with stage boundaries marked. ``pool.<format>``: how the candidate pool evolved, which candidate
was made from which. ``cell_normal|cell_reduce.<format>`` once the search has derived its cells.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator

from prnas_jax import cli, genotype, metrics, ops, pictures, visualize
from prnas_jax.errors import UserError

CELLS = {'normal': 'normal cell', 'reduce': 'reduction cell'}
FAMILIES = {'conv': 'tab:blue', 'pool': 'tab:orange', 'skip': 'tab:green', 'none': 'tab:grey'}
_EPOCH_TAGS = ('train/', 'valid/', 'epoch/')
# a dot on the last value of a per-stage series: the final (or the current) pool
_LAST = {'marker': 'o', 'markevery': slice(-1, None), 'clip_on': False}


class Logs:
  """A search's ``scalars.jsonl`` split by axis; a later record of the same tag and step wins
  (a rerun into the same workdir appends)."""

  def __init__(self, workdir: Path):
    workdir = Path(workdir)
    if not workdir.is_dir():
      raise UserError(f'workdir {workdir} does not exist: pass the --workdir of a search')
    if not (workdir / 'scalars.jsonl').is_file():
      raise UserError(f'{workdir} has no scalars.jsonl: pass the --workdir of a search that has '
                      'started its first stage')
    self.epochs, self.stages = {}, {}
    for record in metrics.read_scalars(workdir):
      step = record.pop('step')
      for tag, value in record.items():
        axis = self.epochs if tag.startswith(_EPOCH_TAGS) else self.stages
        axis.setdefault(tag, {})[step] = value
    if 'stage/epochs' not in self.stages:
      raise UserError(f'{workdir}/scalars.jsonl holds no stage yet: draw again once the search '
                      'has started its first stage')
    epochs = self.stages['stage/epochs']
    self.bounds = np.concatenate([[0], np.cumsum([epochs[i] for i in sorted(epochs)])])

  def epoch_series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(epoch middle, value) pairs of a per-epoch tag, broken by NaN between stages."""
    x, y, stage = [], [], None
    for step in sorted(self.epochs.get(tag, {})):
      now = np.searchsorted(self.bounds, step, 'right')
      if stage is not None and now != stage:
        x.append(np.nan)
        y.append(np.nan)
      stage = now
      x.append(step + 0.5)
      y.append(self.epochs[tag][step])
    return np.asarray(x), np.asarray(y)

  def stage_series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, value) pairs of a per-stage tag to draw as steps: a value holds from its stage's
    first epoch to the next value or to its stage's end; the step after the last stage (the
    final pool) sits at the last epoch."""
    steps = [s for s in sorted(self.stages.get(tag, {})) if s < len(self.bounds)]
    values = [self.stages[tag][s] for s in steps]
    if steps and steps[-1] + 1 < len(self.bounds):
      steps, values = steps + [steps[-1] + 1], values + values[-1:]
    return self.bounds[steps], np.asarray(values)

  def edges(self, kind: str, name: str) -> list[str]:
    """The per-edge tags ``switches_<kind><name>/p<e>``, by edge."""
    prefix = f'switches_{kind}{name}/p'
    return sorted((t for t in self.stages if t.startswith(prefix) and t[len(prefix):].isdigit()),
                  key=lambda t: int(t[len(prefix):]))


def draw_progress(logs: Logs, title: str = ''):
  """The figure of the search's progress over epochs (six panels)."""
  fig = pictures.figure(13, 10)
  axes = fig.subplots(3, 2, sharex=True).ravel()
  ax = axes[0]
  for kind, colour, lw in zip(CELLS, ('tab:blue', 'tab:red'), (3, 1.5)):
    per_edge = [logs.stage_series(t) for t in logs.edges(kind, '/candidates')]
    if per_edge:
      x, counts = per_edge[0][0], np.stack([v for _, v in per_edge])
      ax.plot(x, counts.mean(0), drawstyle='steps-post', color=colour, lw=lw, **_LAST,
              label=f'{kind}: mean (band: min-max)')
      ax.fill_between(x, counts.min(0), counts.max(0), step='post', color=colour, alpha=0.2)
  ax.plot(*logs.stage_series('stage/new'), 'k--', drawstyle='steps-post',
          label='new per edge (stage.new)')
  ax.set(title='candidates per edge', ylabel='candidates')
  axes[1].plot(*logs.epoch_series('epoch/lr'), color='tab:purple')
  axes[1].set(title='learning rate (weights)')
  ax = axes[2]
  ax.plot(*logs.epoch_series('train/accuracy'), label='train')
  ax.plot(*logs.epoch_series('valid/accuracy'), 'o-', label='validation')
  ax.set(title='accuracy', ylabel='accuracy')
  ax = axes[3]
  for kind, colour, lw in zip(CELLS, ('tab:blue', 'tab:red'), (3, 1.5)):
    ax.plot(*logs.stage_series(f'switches_{kind}_similarity/avg'), drawstyle='steps-post',
            color=colour, lw=lw, label=kind, **_LAST)
  ax.set(title='average op similarity per edge', ylim=(0, 1.05))
  for ax, (kind, name) in zip(axes[4:], CELLS.items()):
    below = None
    for family, colour in FAMILIES.items():
      x, v = logs.stage_series(f'switches_{kind}_type/avg/{family}')
      if len(x):
        below = np.zeros_like(v) if below is None else below
        ax.fill_between(x, below, below + v, step='post', color=colour, alpha=0.7, label=family)
        below = below + v
    ax.set(title=f'op types, {name}', ylabel='fraction', ylim=(0, 1), xlabel='epoch')
  for n, ax in enumerate(axes):
    for b in logs.bounds[1:-1]:
      ax.axvline(b, color='grey', ls=':', lw=1)
    ax.set_xlim(0, max(logs.bounds[-1], 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc='best')
  middles = (logs.bounds[:-1] + logs.bounds[1:]) / 2
  for ax in axes[:2]:
    top = ax.secondary_xaxis('top')
    top.set_xticks(middles, [f'stage {i}' for i in range(len(middles))], fontsize=8,
                   color='grey')
    top.tick_params(length=0)
  fig.suptitle(title or 'search progress')
  fig.tight_layout()
  return fig


def _stage_records(workdir: Path) -> list[dict]:
  paths = sorted((p for p in Path(workdir).glob('stages/stage*.json') if p.stem[5:].isdigit()),
                 key=lambda p: int(p.stem[5:]))
  records = []
  for path in paths:
    try:
      records.append(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
      raise UserError(f'{path} is not a stage record ({e}): restore it, or move stages/ away to '
                      'draw the progress alone') from None
  return records


def _lineage(records: list[dict], kind: str):
  """(column per candidate: the stage it was first trained in, Counter of (parent, child) over
  edges, candidates active after the last record)."""
  column, links = {}, Counter()
  for record in records:
    for edge in record['probs'][kind]:
      for name in edge:
        column.setdefault(name, record['stage'])
    for c in record['events'][kind]['created']:
      column.setdefault(c['child'], record['stage'] + 1)
      links[c['parent'], c['child']] += 1
  last = records[-1]['space'][kind]
  active = {name for j, name in enumerate(last['candidates'])
            if any(r[j] and d[j] for r, d in zip(last['remaining'], last['discovered']))}
  return column, links, active


def draw_pool(records: list[dict], title: str = ''):
  """The figure of the pools' lineage: one column per stage, an arrow from each parent to each
  child it was morphed into (width: on how many edges); a bold box stays active at the end."""
  fig = pictures.figure(1, 1)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_axis_off()
  dx, dy, box = 3.0, 0.42, np.array([2.2, 0.3])
  top, right = 0.0, 0.0
  for kind, name in CELLS.items():
    column, links, active = _lineage(records, kind)
    ax.text(0, top, name, fontsize=12, va='bottom', ha='left')
    top -= 0.5
    by_column = {}
    for cand, col in column.items():
      by_column.setdefault(col, []).append(cand)
    centres = {}
    for col, names in sorted(by_column.items()):
      ax.text(col * dx + box[0] / 2, top, f'stage {col}', ha='center', va='bottom', fontsize=9,
              color='grey')
      for row, cand in enumerate(sorted(names, key=lambda c: (ops.parse(c).family, c))):
        centre = np.array([col * dx + box[0] / 2, top - 0.35 - row * dy])
        spec = ops.parse(cand)
        ax.add_patch(FancyBboxPatch(tuple(centre - box / 2), *box, boxstyle='round,pad=0.02',
                                    fc=FAMILIES.get(spec.family, 'white'), alpha=0.35,
                                    ec='black', lw=2.2 if cand in active else 0.6))
        ax.text(*centre, spec.label, ha='center', va='center', fontsize=8,
                fontweight='bold' if cand in active else 'normal')
        centres[cand] = centre
        right = max(right, centre[0] + box[0] / 2)
    most = max(links.values(), default=1)
    for (parent, child), count in links.items():
      forward = column[child] > column[parent]
      half = np.array([box[0] / 2, 0])
      ax.add_artist(FancyArrowPatch(
          tuple(centres[parent] + half), tuple(centres[child] - half),
          connectionstyle=f'arc3,rad={0 if forward else 0.3}', arrowstyle='-|>',
          mutation_scale=10, lw=0.5 + 2.5 * count / most, color='black', alpha=0.6, zorder=3))
    top -= 0.35 + max(map(len, by_column.values())) * dy + 0.4
  ax.text(0, top, 'arrow: parent -> child, width: on how many edges; bold: active after stage '
          f'{records[-1]["stage"]}', fontsize=8, va='top', color='grey')
  header = 0.4 if title else 0.0
  if title:
    ax.text(0, 0.6, title, fontsize=13, va='bottom')
  ax.set_xlim(-0.3, right + 0.3)
  ax.set_ylim(top - 0.4, 0.3 + header + 0.3)
  fig.set_size_inches(right + 0.6, 1.0 + header - top)
  return fig


def draw_run(workdir, out_dir=None, fmt: str = 'png') -> list[Path]:
  """Writes the pictures of the search in ``workdir`` into ``out_dir`` (default ``workdir``):
  report, pool (once a stage has ended) and cells (once derived); returns their paths."""
  workdir = cli.check_folder(workdir, 'WORKDIR')
  out_dir = cli.check_folder(out_dir, '--out') if out_dir else workdir
  title = f'search {workdir.resolve().name}'
  paths = [pictures.save(draw_progress(Logs(workdir), title), out_dir / f'report.{fmt}')]
  if records := _stage_records(workdir):
    paths.append(pictures.save(draw_pool(records, f'{title}: candidate pool'),
                               out_dir / f'pool.{fmt}'))
  if (workdir / 'genotype.json').is_file():
    paths += visualize.draw_cells(genotype.load(workdir / 'genotype.json'), out_dir, fmt,
                                  name=f'search {workdir.resolve().name}:')
  return paths


def main() -> None:
  """``prnas-report WORKDIR`` and ``python -m prnas_jax.report WORKDIR``."""
  out, fmt = cli.picture_flags('Folder for the pictures (default: WORKDIR).')

  def draw(workdir):
    for path in draw_run(workdir, out.value, fmt.value):
      print(path)
  cli.run(draw, args=('WORKDIR',))


if __name__ == '__main__':
  main()
