"""Genotypes: validation, JSON and DARTS-name I/O, the registry, derivation and the skip limit."""
import json
import os

import numpy as np
import pytest

from prnas_jax import genotype as gt
from prnas_jax import ops
from prnas_jax.errors import UserError
from prnas_jax.genotype import Genotype
from prnas_jax.ops import Conv, FacConv, Pool, Skip, Zero

MAX, AVG, S, Z = Pool('max', 3), Pool('avg', 3), Skip(), Zero()
SEP3, SEP5, C3 = Conv(3, 1, (1,)), Conv(5, 1, (1,)), Conv(3)

DARTS_V2_PUBLISHED = {
    'normal': [['sep_conv_3x3', 0], ['sep_conv_3x3', 1], ['sep_conv_3x3', 0], ['sep_conv_3x3', 1],
               ['sep_conv_3x3', 1], ['skip_connect', 0], ['skip_connect', 0], ['dil_conv_3x3', 2]],
    'normal_concat': [2, 3, 4, 5],
    'reduce': [['max_pool_3x3', 0], ['max_pool_3x3', 1], ['skip_connect', 2], ['max_pool_3x3', 1],
               ['max_pool_3x3', 0], ['skip_connect', 2], ['skip_connect', 2], ['max_pool_3x3', 1]],
    'reduce_concat': [2, 3, 4, 5],
}


def _skips(entries):
  return sum(isinstance(spec, Skip) for spec, _ in entries)


# ------------------------------------------------------------------------------ FacConv spec


def test_fac_conv_names():
  spec = FacConv(7)
  assert (str(spec), spec.label, ops.darts_name(spec)) == (
      'fac_conv(7)', 'Conv(1x7, 7x1)', 'conv_7x1_1x7')
  assert ops.parse('fac_conv(7)') == ops.parse('conv_7x1_1x7') == spec
  assert (spec.family, spec.morphable) == ('fac_conv', False)
  with pytest.raises(UserError, match='fac_conv kernel k=4'):
    ops.parse('fac_conv(4)')


# ------------------------------------------------------------------------------ registry


@pytest.mark.parametrize('name', list(gt.REGISTRY))
def test_json_round_trip(name, tmp_path):
  g = gt.REGISTRY[name]
  assert Genotype.from_json(json.loads(json.dumps(g.to_json()))) == g
  path = tmp_path / f'{name}.json'
  gt.save(g, path)
  assert json.loads(path.read_text()) == g.to_json()
  assert gt.load(str(path)) == g
  assert gt.load(path) == g


@pytest.mark.parametrize('name', list(gt.REGISTRY))
def test_registry_cells_are_well_formed(name):
  g = gt.REGISTRY[name]
  for cell in gt.CELLS:
    entries = getattr(g, cell)
    assert len(entries) == 2 * g.nodes(cell)
    for n in range(g.nodes(cell)):
      (_, a), (_, b) = entries[2 * n:2 * n + 2]
      assert a <= b < n + 2


def test_load_registry_names_case_insensitively():
  assert gt.load('dl2') is gt.load('DL2') is gt.REGISTRY['DL2']
  assert gt.load('amoebanet') is gt.AmoebaNet


def test_prdarts_cells_match_reference():
  """Spot checks against prdarts-reference.md §7.2."""
  assert gt.DL2.normal[2:4] == ((Conv(3, 1, ()), 1), (Conv(7, 1, (1,)), 2))
  assert gt.DL1.normal[6:8] == ((S, 0), (S, 2))
  assert gt.DL1.reduce[6:8] == ((MAX, 1), (SEP3, 4))
  assert gt.DR.normal[0:2] == ((Conv(3), 0), (Conv(3, 1, (3,)), 1))
  assert gt.DR.reduce[6:8] == ((MAX, 0), (Conv(1, 1, (1,)), 3))
  assert gt.UR.normal[2:4] == ((Conv(3, 1, (1, 1, 1)), 1), (Conv(5), 2))
  assert gt.UR.reduce[6:8] == ((Conv(7, 1, (1, 1)), 1), (S, 2))
  assert [_skips(gt.REGISTRY[n].normal) for n in ('DL1', 'DL2', 'DR', 'UR')] == [4, 1, 4, 0]
  for name in ('DL1', 'DL2', 'DR', 'UR'):
    g = gt.REGISTRY[name]
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    specs = {spec for cell in gt.CELLS for spec, _ in getattr(g, cell)}
    assert all(spec.d == 1 for spec in specs if isinstance(spec, Conv))


def _by_node(rows):
  return [sorted(map(tuple, rows[n:n + 2])) for n in range(0, len(rows), 2)]


def test_published_cells():
  darts = gt.DARTS_V2.to_darts()
  for key in gt.KEYS:  # the same cell; each node's pair now in ascending input order
    assert (_by_node(darts[key]) == _by_node(DARTS_V2_PUBLISHED[key]) if key in gt.CELLS
            else darts[key] == DARTS_V2_PUBLISHED[key])
  assert darts['normal'][4:6] == [['skip_connect', 0], ['sep_conv_3x3', 1]]
  assert darts['reduce'][2:4] == [['max_pool_3x3', 1], ['skip_connect', 2]]
  # DARTS lists node 0 of DARTS_V1 as (sep 1, sep 0); stored in ascending input order.
  assert gt.DARTS_V1.normal[:2] == ((SEP3, 0), (SEP3, 1))
  assert gt.DARTS_V1.reduce[2:4] == ((MAX, 0), (S, 2))
  assert gt.DARTS_V1.reduce[6:8] == ((AVG, 0), (S, 2))
  assert gt.PDARTS.normal[4:8] == ((SEP3, 1), (SEP3, 3), (SEP3, 0), (Conv(5, 2), 4))
  assert gt.PDARTS.reduce[2:4] == ((SEP3, 0), (Conv(5, 2), 2))
  assert gt.NASNet.normal[:2] == ((SEP3, 0), (SEP5, 1))
  assert gt.NASNet.reduce[6:8] == ((AVG, 2), (S, 3))
  assert (gt.NASNet.nodes('normal'), gt.NASNet.normal_concat, gt.NASNet.reduce_concat) == (
      5, (2, 3, 4, 5, 6), (4, 5, 6))
  assert gt.AmoebaNet.reduce[8:10] == ((FacConv(7), 0), (SEP3, 5))
  assert gt.AmoebaNet.normal[6:8] == ((SEP3, 1), (S, 1))  # both inputs c_{k-1}, order kept
  assert (gt.AmoebaNet.normal_concat, gt.AmoebaNet.reduce_concat) == ((4, 5, 6), (3, 4, 6))
  assert gt.AmoebaNet.to_darts()['reduce'][8] == ['conv_7x1_1x7', 0]


def test_to_darts_is_none_without_darts_names():
  assert gt.DL2.to_darts() is None  # conv(3,1,[]) has no DARTS name
  assert gt.DL1.to_darts()['normal'][0] == ['sep_conv_5x5', 0]


def test_nodes_rejects_unknown_cell():
  with pytest.raises(UserError, match='unknown cell type'):
    gt.DL1.nodes('reduction')


# ------------------------------------------------------------------------------ reading files


def test_darts_and_canonical_names_load_the_same(tmp_path):
  ours, darts = tmp_path / 'ours.json', tmp_path / 'darts.json'
  ours.write_text(json.dumps(gt.DARTS_V2.to_json()))
  darts.write_text(json.dumps(DARTS_V2_PUBLISHED))
  assert 'conv(k=3,d=1,mul=[1])' in ours.read_text()
  assert gt.load(str(ours)) == gt.load(str(darts)) == gt.DARTS_V2


def _reference_op(spec, i):
  if isinstance(spec, Conv):
    return ['conv', {'c_mul': list(spec.mul), 'dil': spec.d, 'k': spec.k}, i]
  if isinstance(spec, Pool):
    return ['pool', {'k': spec.k, 'type_': spec.kind}, i]
  return [str(spec), {}, i]


def test_reference_array_format_loads(tmp_path):
  g = gt.DR
  array = [[_reference_op(*e) for e in g.normal], list(g.normal_concat),
           [_reference_op(*e) for e in g.reduce], list(g.reduce_concat)]
  path = tmp_path / 'genotype.json'
  path.write_text(json.dumps(array))
  assert gt.load(str(path)) == g
  # A literal fragment as the reference writes it (defaults: c_mul [], dil 1, k 3).
  normal = [['conv', {'c_mul': [1], 'dil': 1, 'k': 5}, 0], ['conv', {}, 1],
            ['pool', {'k': 3, 'type_': 'max'}, 0], ['skip', {}, 2]]
  reduce = [['pool', {'type_': 'avg'}, 1], ['conv_7x1_1x7', {}, 0]]
  g = Genotype.from_json([normal, [2, 3], reduce, [2]])
  assert g.normal == ((SEP5, 0), (C3, 1), (MAX, 0), (S, 2))
  assert g.reduce == ((FacConv(7), 0), (AVG, 1))


def test_save_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / 'run' / 'genotype.json'
  gt.save(gt.DL1, path)
  gt.save(gt.DL2, path)  # overwrite
  assert os.listdir(path.parent) == ['genotype.json']
  assert gt.load(str(path)) == gt.DL2
  assert '\n    ["conv(k=3,d=1,mul=[1])", 0],\n' in path.read_text()  # one entry per line

  def fail(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    gt.save(gt.UR, path)
  assert os.listdir(path.parent) == ['genotype.json']  # no temporary file left
  assert gt.load(str(path)) == gt.DL2  # the old content is intact


def _write(tmp_path, text):
  path = tmp_path / 'bad.json'
  path.write_text(text)
  return str(path)


def _good():
  return gt.DARTS_V2.to_json()


def _with(key, value):
  obj = _good()
  obj[key] = value
  return json.dumps(obj)


def _normal_entry(n, value):
  obj = _good()
  obj['normal'][n] = value
  return json.dumps(obj)


BAD_FILES = [
    ('{"normal": [', r'not valid JSON \(line 1, column 13'),
    ('[1, 2]', r'found a JSON array of length 2: write a JSON object with keys normal'),
    ('"DL2"', r'found a JSON string: write a JSON object'),
    (json.dumps({k: v for k, v in _good().items() if k != 'reduce_concat'}),
     r'the object lacks reduce_concat: write'),
    (_with('normal_concatt', [2]), r'unknown keys normal_concatt'),
    (_with('normal', {'a': 1}), r'normal is a JSON object: write a list of \[candidate, input\]'),
    (_normal_entry(3, ['sep_conv_3x3']),
     r'normal entry 3 is \["sep_conv_3x3"\]: write \[candidate'),
    (_normal_entry(3, ['sep_conv_3x3', '1']), r'normal entry 3 has input "1": use an integer'),
    (_normal_entry(3, ['sep_conv_9x7', 1]),
     r"normal entry 3: unknown candidate 'sep_conv_9x7': use one of none, skip"),
    (_normal_entry(3, ['conv', {'c_mul': [1], 'kernel': 3}, 1]),
     r'normal entry 3: conv has unknown kwargs kernel: use only c_mul, k, dil'),
    (_normal_entry(3, ['pool', {'k': 3}, 1]), r'pool lacks its type_'),
    (_with('normal', _good()['normal'][:7]),
     r'normal has 7 entries, so a node lacks a second input: give every node exactly two'),
    (_with('reduce', []), r'reduce has 0 entries'),
    (_normal_entry(1, ['skip_connect', 2]),
     r'normal node 0 takes input 2, which does not exist there: node i may take inputs 0..i\+1'),
    (_normal_entry(7, ['skip_connect', -1]), r'normal node 3 takes input -1'),
    (_with('normal_concat', [2, 3, 4, 6]),
     r'normal_concat lists 6, but the cell has 4 nodes: use node indices 2..5'),
    (_with('reduce_concat', [2, 2]), r'reduce_concat \[2, 2\] lists a node twice'),
    (_with('reduce_concat', []), r'reduce_concat is empty'),
    (_with('reduce_concat', '2345'), r'reduce_concat is "2345": write a list of node indices'),
]


@pytest.mark.parametrize('text,message', BAD_FILES)
def test_bad_files_are_one_line_errors(tmp_path, text, message):
  path = _write(tmp_path, text)
  with pytest.raises(UserError, match=message) as info:
    gt.load(path)
  text = str(info.value)
  assert '\n' not in text and text.startswith(f'{path}: ')


def test_missing_file_and_folder(tmp_path):
  for path, why in [(tmp_path / 'nope.json', 'does not exist'), (tmp_path, 'is a folder')]:
    with pytest.raises(UserError, match=why) as info:
      gt.load(str(path))
    text = str(info.value)
    assert '\n' not in text and str(path) in text
    assert 'use one of DL1, DL2, DR, UR, DARTS_V1' in text


def test_binary_file_is_not_json(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_bytes(b'\xff\xfe\x00garbage')
  with pytest.raises(UserError, match='not valid JSON') as info:
    gt.load(str(path))
  assert '\n' not in str(info.value)


def test_constructor_validates_and_normalises():
  g = Genotype([('skip', 1), (SEP3, 0)], range(2, 3), [(MAX, 0), ('max_pool_3x3', 1)], [2])
  assert g.normal == ((SEP3, 0), (S, 1)) and g.normal_concat == (2,)
  assert g.reduce == ((MAX, 0), (MAX, 1))
  with pytest.raises(UserError, match='normal entry 1 has candidate 3'):
    Genotype([(SEP3, 0), (3, 1)], [2], [(MAX, 0), (MAX, 1)], [2])
  with pytest.raises(UserError, match='normal node 0 takes input True'):
    Genotype([(SEP3, 0), (S, True)], [2], [(MAX, 0), (MAX, 1)], [2])


# ------------------------------------------------------------------------------ derivation


def _edges(nodes):
  return [(i, j) for i in range(nodes) for j in range(i + 2)]


def test_derive_keeps_top_two_edges():
  w = [
      {SEP3: .7, MAX: .3}, {S: .6, C3: .4},                       # node 0: both edges
      {MAX: .2, S: .1}, {SEP3: .9}, {AVG: .5, S: .4},             # node 1: j = 1, 2
      {SEP5: .8}, {MAX: .1}, {C3: .3, S: .25}, {S: .7},           # node 2: j = 0, 3
      {MAX: .1}, {S: .2}, {AVG: .3}, {C3: .6, S: .1}, {SEP3: .5},  # node 3: j = 3, 4
  ]
  assert gt.derive(w) == ((SEP3, 0), (S, 1), (SEP3, 1), (AVG, 2), (SEP5, 0), (S, 3), (C3, 3),
                          (SEP3, 4))


def test_derive_ties_go_to_the_lower_input():
  w = [{C3: .5}, {C3: .5}, {MAX: .5}, {AVG: .5}, {S: .5}]
  assert gt.derive(w) == ((C3, 0), (C3, 1), (MAX, 0), (AVG, 1))
  # Equal weights on one edge: the first candidate in the edge's order.
  assert gt.derive([{AVG: .5, MAX: .5}, {MAX: .5, AVG: .5}]) == ((AVG, 0), (MAX, 1))


def test_derive_ignores_zero():
  w = [
      {Z: .9, SEP3: .06, S: .04}, {Z: .8, MAX: .05, C3: .15},  # Zero tops both: best non-zero
      {Z: .9, C3: .06, S: .04}, {Z: .1, MAX: .5, S: .4}, {Z: .2, SEP3: .45, S: .35},
  ]
  assert gt.derive(w) == ((SEP3, 0), (C3, 1), (MAX, 1), (SEP3, 2))
  # An edge with only Zero is never chosen, even against a weak edge.
  w = [{C3: 1.0}, {C3: 1.0}, {Z: 1.0}, {S: .01, Z: .99}, {MAX: .02, Z: .98}]
  assert gt.derive(w)[2:] == ((S, 1), (MAX, 2))


def test_derive_fails_without_two_candidate_edges():
  with pytest.raises(ValueError, match='node 1 has 1 incoming edge'):
    gt.derive([{C3: 1.0}, {C3: 1.0}, {Z: 1.0}, {}, {S: .5, Z: .5}])
  with pytest.raises(ValueError, match='13 edges do not form a cell'):
    gt.derive([{C3: 1.0}] * 13)


@pytest.mark.parametrize('nodes', [1, 4, 5])
def test_derive_gives_two_inputs_per_node(nodes):
  rng = np.random.default_rng(nodes)
  space = [Z, MAX, AVG, S, SEP3, SEP5, Conv(3, 2), Conv(5, 2)]
  for _ in range(20):
    w = [dict(zip(space, rng.dirichlet(np.ones(len(space))))) for _ in _edges(nodes)]
    entries = gt.derive(w)
    assert len(entries) == 2 * nodes
    for n in range(nodes):
      (a_spec, a), (b_spec, b) = entries[2 * n:2 * n + 2]
      assert a < b < n + 2 and Z not in (a_spec, b_spec)
    g = Genotype(entries, range(2, nodes + 2), entries, range(2, nodes + 2))
    assert g.nodes('normal') == nodes


def _skip_heavy():
  return [
      {S: .6, C3: .3, Z: .1}, {SEP3: .7, S: .2, Z: .1},                         # node 0
      {S: .5, MAX: .15, Z: .35}, {SEP3: .4, S: .35, Z: .25}, {MAX: .2, S: .1, Z: .7},  # node 1
      {S: .8, SEP3: .15, Z: .05}, {SEP3: .6, Z: .4}, {MAX: .3, Z: .7}, {S: .3, Z: .7},  # node 2
      {SEP3: .5, Z: .5}, {MAX: .4, Z: .6}, {S: .1, Z: .9}, {S: .05, Z: .95}, {C3: .2, Z: .8},
  ]


def test_max_skip_replaces_the_weakest_skips():
  w = _skip_heavy()
  tail = ((SEP3, 0), (MAX, 1))  # node 3 has no skip
  unlimited = ((S, 0), (SEP3, 1), (S, 0), (SEP3, 1), (S, 0), (SEP3, 1)) + tail
  assert gt.derive(w) == gt.derive(w, max_skip=3) == unlimited
  # First the skip on node 1's edge 0 (.5) goes: that edge drops to .15 and loses to edge 2's
  # max pool; then node 0's (.6), whose edge falls back to its conv.
  limited = ((C3, 0), (SEP3, 1), (SEP3, 1), (MAX, 2), (S, 0), (SEP3, 1)) + tail
  assert gt.derive(w, max_skip=1) == limited
  assert gt.derive(w, max_skip=2)[2:4] == ((SEP3, 1), (MAX, 2))
  assert _skips(gt.derive(w, max_skip=2)) == 2
  # Then node 2's (.8): edges 2 (max .3) and 3 (skip .3) tie, the lower input wins.
  assert gt.derive(w, max_skip=0)[4:6] == ((SEP3, 1), (MAX, 2))
  assert _skips(gt.derive(w, max_skip=0)) == 0
  assert w == _skip_heavy()  # the caller's weights are untouched
