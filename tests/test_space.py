"""Search-space bookkeeping: JSON, pruning and replacement (reference §5.4-5.6)."""
import numpy as np
import pytest

from prnas_jax import morph, ops, space
from prnas_jax.ops import Conv, Pool

DARTS_LIKE = morph.get_preset('darts_like')


def test_initial_space_and_edges():
  sp = space.initial_space('prdarts4')
  assert set(sp) == {'normal', 'reduce'} and sp['normal'] is not sp['reduce']
  assert space.edge_inputs()[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
  assert len(space.edge_inputs()) == 14
  assert sp['normal'].active_specs()[13] == ops.START_SETS['prdarts4']


def test_json_round_trip_after_changes():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts5'])
  cell.prune(2, [0.1, 0.3, 0.2, 0.15, 0.25], keep=4, new=2)
  cell.replace(2, {c: 0.5 for c in cell.active(2)}, 2, DARTS_LIKE, np.random.default_rng(0))
  again = space.CellSpace.from_json(cell.to_json())
  assert again == cell
  assert again.candidates == cell.candidates
  assert again.parents == cell.parents and again.pending == cell.pending


def test_prune_keeps_exactly_the_most_probable():
  cell = space.CellSpace.from_start(ops.START_SETS['darts'])  # 8 candidates
  probs = [0.05, 0.2, 0.1, 0.3, 0.02, 0.15, 0.08, 0.1]
  dropped = cell.prune(0, probs, keep=6, new=3, keep_morphable=False)  # 3 survive
  assert sorted(dropped) == [0, 2, 4, 6, 7]  # ties 0.1 (cols 2, 7): the lower column drops first
  assert cell.active(0) == [1, 3, 5]
  assert cell.active(1) == list(range(8))  # other edges untouched


def test_prune_spares_the_best_morphable():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  dropped = cell.prune(0, [0.4, 0.3, 0.25, 0.05], keep=2, new=1)  # one survivor
  assert dropped == [2, 1, 0]  # the conv (col 3) is spared although least probable
  assert cell.active(0) == [3]
  last = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  last.prune(0, [0.4, 0.3, 0.25, 0.05], keep=1, new=0, keep_morphable=False)
  assert last.active(0) == [0]


def test_prune_drop_zero_and_negative_counts():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts5'])
  assert cell.prune(0, [0.9, 0.02, 0.03, 0.04, 0.01], keep=4, new=0, drop_zero=True) == [0]
  assert cell.prune(1, [0.2] * 5, keep=6, new=0) == []  # would be negative: nothing dropped
  with pytest.raises(ValueError, match='active candidates'):
    cell.prune(2, [0.5, 0.5], keep=1, new=0)


def test_replace_bookkeeping():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  made, failed = cell.replace(5, {c: p for c, p in zip(range(4), [0.1, 0.2, 0.3, 0.4])}, 3,
                              DARTS_LIKE, np.random.default_rng(0))
  assert failed == 0 and len(made) == 3
  children = {cell.candidates[c] for c, _, _ in made}
  assert children == {Conv(5), Conv(3, 2), Conv(3, 1, (1,))}  # the conv's three moves
  for child, parent, prob in made:
    assert parent == 3 and prob == pytest.approx(0.4)
    assert cell.parents[5][child] == 3 and child in cell.pending[5]
  assert cell.candidates[:4] == list(ops.START_SETS['prdarts4'])
  assert cell.remaining[:, 4:].all()  # available on every edge ...
  assert cell.discovered[5, 4:].all() and not cell.discovered[np.arange(14) != 5, 4:].any()
  assert len(cell.active(5)) == 7 and len(cell.active(0)) == 4  # ... active only here


def test_replace_reuses_columns_across_edges():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  rng = np.random.default_rng(1)
  cell.replace(0, {3: 1.0}, 3, DARTS_LIKE, rng)
  cell.replace(1, {3: 1.0}, 3, DARTS_LIKE, rng)
  assert len(cell.candidates) == 7
  assert cell.active(0) == cell.active(1) == list(range(7))


def test_replace_fails_without_morphable_parents():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  made, failed = cell.replace(0, {0: 0.5, 1: 0.3, 2: 0.2}, 2, DARTS_LIKE,
                              np.random.default_rng(0))
  assert made == [] and failed == 2


def test_revival_only_in_the_last_tries():
  cell = space.CellSpace.from_start([Pool('max', 3), Conv(7, 2, (1,))])
  for spec in (Conv(5, 2, (1,)), Conv(7, 1, (1,))):  # the only two children, both pruned here
    col = cell.column(spec)
    cell.discovered[0, col] = True
    cell.remaining[0, col] = False
  made, failed = cell.replace(0, {1: 1.0}, 1, DARTS_LIKE, np.random.default_rng(0), tries=150)
  assert made == [] and failed == 1
  made, failed = cell.replace(0, {1: 1.0}, 2, DARTS_LIKE, np.random.default_rng(0))
  assert failed == 0 and {c for c, _, _ in made} == {2, 3}
  assert cell.active(0) == [0, 1, 2, 3]


def test_transfers_once_or_every_stage():
  cell = space.CellSpace.from_start(ops.START_SETS['prdarts4'])
  made, _ = cell.replace(0, {3: 1.0}, 1, DARTS_LIKE, np.random.default_rng(0))
  child = made[0][0]
  assert cell.transfers() == [(0, 3, child)]
  cell.clear_pending()
  assert cell.transfers() == []
  assert cell.transfers(every_stage=True) == [(0, 3, child)]
  cell.prune(0, [0.2, 0.2, 0.2, 0.1, 0.3], keep=3, new=0)  # the parent goes; no transfer
  assert 3 not in cell.active(0) and cell.transfers(every_stage=True) == []
