"""The search-space state per cell type (reference §5.4-5.6): candidate columns, per-edge flags,
lineage, and the prune and replace rules. Host-side plain data, JSON round-trippable."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from prnas_jax import genotype, morph, ops
from prnas_jax.ops import Spec

CELL_TYPES = ('normal', 'reduce')
NODES = 4
CONCAT = (2, 3, 4, 5)  # every node is part of a searched cell's output


def edge_inputs(nodes: int = NODES) -> list[tuple[int, int]]:
  """(node, input) of every edge, node by node, inputs ascending: 14 edges for 4 nodes."""
  return [(i, j) for i in range(nodes) for j in range(i + 2)]


@dataclasses.dataclass
class CellSpace:
  """One cell type's candidate pool.

  ``candidates`` are the global columns (append-only). Per edge and column: ``remaining`` (not
  pruned) and ``discovered`` (activated on this edge at some point); active = both.
  ``parents[e]`` maps a morphed column to the column it was last made from on edge e, and
  ``pending[e]`` holds the columns created or revived on edge e that still await their
  initialisation from that parent.
  """
  candidates: list[Spec]
  remaining: np.ndarray
  discovered: np.ndarray
  parents: list[dict[int, int]]
  pending: list[set[int]]

  @classmethod
  def from_start(cls, start: Sequence[Spec], nodes: int = NODES) -> CellSpace:
    edges, k = len(edge_inputs(nodes)), len(start)
    return cls(list(start), np.ones((edges, k), bool), np.ones((edges, k), bool),
               [{} for _ in range(edges)], [set() for _ in range(edges)])

  @property
  def num_edges(self) -> int:
    return self.remaining.shape[0]

  def active(self, edge: int) -> list[int]:
    return np.flatnonzero(self.remaining[edge] & self.discovered[edge]).tolist()

  def active_specs(self) -> tuple[tuple[Spec, ...], ...]:
    return tuple(tuple(self.candidates[c] for c in self.active(e)) for e in range(self.num_edges))

  def column(self, spec: Spec) -> int:
    """The column of ``spec``, appended (available, undiscovered on every edge) if new."""
    if spec in self.candidates:
      return self.candidates.index(spec)
    self.candidates.append(spec)
    pad = np.zeros((self.num_edges, 1), bool)
    self.remaining = np.concatenate([self.remaining, ~pad], axis=1)
    self.discovered = np.concatenate([self.discovered, pad], axis=1)
    return len(self.candidates) - 1

  # ------------------------------------------------------------------------------ prune

  def prune(self, edge: int, probs: Sequence[float], keep: int, new: int,
            keep_morphable: bool = True, drop_zero: bool = False) -> list[int]:
    """Drops the weakest active candidates of ``edge`` so that ``keep - new`` survive.

    ``probs`` are the softmax weights of the active candidates (ascending column order).
    Ranking is ascending by probability, ties by column; ``drop_zero`` puts ``none`` first in
    line; ``keep_morphable`` spares the most probable morphable candidate. Returns the dropped
    columns.
    """
    cols = self.active(edge)
    if len(probs) != len(cols):
      raise ValueError(f'edge {edge} has {len(cols)} active candidates, got {len(probs)} probs')
    order = [cols[i] for i in np.argsort(np.asarray(probs), kind='stable')]
    if drop_zero:
      order = ([c for c in order if isinstance(self.candidates[c], ops.Zero)] +
               [c for c in order if not isinstance(self.candidates[c], ops.Zero)])
    if keep_morphable:
      morphable = [c for c in order if self.candidates[c].morphable]
      if morphable:
        order.remove(morphable[-1])
    dropped = order[:max(0, len(cols) - keep + new)]
    self.remaining[edge, dropped] = False
    return dropped

  # ------------------------------------------------------------------------------ replace

  def replace(self, edge: int, probs: dict[int, float], new: int, preset: morph.Preset,
              rng: np.random.Generator, tries: int = 250, revive_after: int = 200
              ) -> tuple[list[tuple[int, int, float]], int]:
    """Adds ``new`` candidates to ``edge`` by morphing survivors (reference §5.5).

    Parents are drawn among the survivors ``probs`` (column -> probability) in proportion to
    their renormalised probability; a non-morphable draw consumes a try. A child is taken if it
    is available on this edge, or, after ``revive_after`` tries, if it was pruned here before
    (revival). Returns ``[(child, parent, parent probability)]`` and the number of failed
    morphs (each after ``tries`` tries).
    """
    parents = list(probs)
    if not parents:
      return [], new
    p = np.asarray([probs[c] for c in parents], np.float64)
    p = p / p.sum()
    made, failed = [], 0
    for _ in range(new):
      for t in range(tries):
        i = rng.choice(len(parents), p=p)
        parent = self.candidates[parents[i]]
        if not parent.morphable:
          continue
        col = self.column(morph.propose(parent, preset, rng))
        available = self.remaining[edge, col] and not self.discovered[edge, col]
        revivable = t > revive_after and self.discovered[edge, col] and not self.remaining[
            edge, col]
        if available or revivable:
          self.remaining[edge, col] = self.discovered[edge, col] = True
          self.parents[edge][col] = parents[i]
          self.pending[edge].add(col)
          made.append((col, parents[i], float(p[i])))
          break
      else:
        failed += 1
    return made, failed

  def transfers(self, every_stage: bool = False) -> list[tuple[int, int, int]]:
    """``(edge, parent column, child column)`` to initialise from parents, children ascending.

    By default the pending ones (created or revived in the last replacement); with
    ``every_stage`` every active child whose recorded parent is active (the reference's quirk).
    """
    out = []
    for e in range(self.num_edges):
      active = set(self.active(e))
      children = (self.parents[e] if every_stage else self.pending[e])
      out += [(e, self.parents[e][c], c) for c in sorted(children)
              if c in active and self.parents[e][c] in active]
    return out

  def clear_pending(self):
    self.pending = [set() for _ in range(self.num_edges)]

  # ------------------------------------------------------------------------------ JSON

  def to_json(self) -> dict:
    return {
        'candidates': [str(s) for s in self.candidates],
        'remaining': self.remaining.astype(int).tolist(),
        'discovered': self.discovered.astype(int).tolist(),
        'parents': [{str(c): p for c, p in sorted(d.items())} for d in self.parents],
        'pending': [sorted(s) for s in self.pending],
    }

  @classmethod
  def from_json(cls, obj: dict) -> CellSpace:
    return cls([ops.parse(s) for s in obj['candidates']],
               np.asarray(obj['remaining'], bool).reshape(-1, len(obj['candidates'])),
               np.asarray(obj['discovered'], bool).reshape(-1, len(obj['candidates'])),
               [{int(c): int(p) for c, p in d.items()} for d in obj['parents']],
               [set(s) for s in obj['pending']])

  def __eq__(self, other):
    return (isinstance(other, CellSpace) and self.to_json() == other.to_json())


def initial_space(start: str | Sequence[Spec]) -> dict[str, CellSpace]:
  """Both cell types from a start set name (``prdarts4``, ``prdarts5``, ``darts``) or specs."""
  specs = ops.start_set(start) if isinstance(start, str) else tuple(start)
  return {t: CellSpace.from_start(specs) for t in CELL_TYPES}


def prune_and_replace(space, probs, search, stage: int, rng: np.random.Generator) -> dict:
  """The end of stage ``stage`` of the search config ``search``: prunes every edge of both cell
  types by ``probs`` (``supernet.edge_probs``), then morphs survivors into new candidates;
  returns what happened."""
  st = search.stages
  last = stage == len(st.epochs) - 1
  preset = morph.get_preset(search.preset)
  events = {}
  for kind, cell in space.items():
    pruned, created, failed = [], [], 0
    for e in range(cell.num_edges):
      cols = cell.active(e)
      dropped = cell.prune(e, [probs[kind][e][c] for c in cols], st.keep[stage], st.new[stage],
                           keep_morphable=search.keep_morphable and not last,
                           drop_zero=last and search.drop_zero_last)
      pruned.append([str(cell.candidates[c]) for c in dropped])
      survivors = {c: probs[kind][e][c] for c in cell.active(e)}
      made, fails = cell.replace(e, survivors, st.new[stage], preset, rng, search.morph_tries,
                                 search.revive_after)
      failed += fails
      created += [{'edge': e, 'child': str(cell.candidates[c]), 'parent': str(cell.candidates[p]),
                   'parent_prob': prob} for c, p, prob in made]
    events[kind] = {'pruned': pruned, 'created': created, 'failed_morphs': failed}
  return events


def derive(space, probs, max_skip_normal: int) -> genotype.Genotype:
  """The genotype of ``space`` by ``probs`` (design decision 4, ``genotype.derive``), with at
  most ``max_skip_normal`` skips in the normal cell (-1: no limit)."""
  cells = {}
  for kind, cell in space.items():
    weights = [{cell.candidates[c]: p for c, p in edge.items()} for edge in probs[kind]]
    limit = max_skip_normal if kind == 'normal' and max_skip_normal >= 0 else None
    cells[kind] = genotype.derive(weights, max_skip=limit)
  return genotype.Genotype(cells['normal'], CONCAT, cells['reduce'], CONCAT)
