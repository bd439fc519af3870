"""Genotypes: the derived cells, their JSON and DARTS-name I/O, and the registry of published cells.

A cell lists two ``(candidate, input)`` entries per node, in node order; input 0 is c_{k-2},
1 is c_{k-1} and ``i + 2`` is node i. Within a node the entries are kept in ascending input order
(the node sums them, so the order carries no meaning). On disk (docs/design.md, "Genotypes")::

  {"normal": [["conv(k=3,d=1,mul=[1])", 0], ...], "normal_concat": [2, 3, 4, 5],
   "reduce": [...], "reduce_concat": [2, 3, 4, 5]}

``load`` also reads DARTS names (``["sep_conv_3x3", 0]``) and the reference's 4-element array
``[normal, normal_concat, reduce, reduce_concat]`` with ops as ``[name, {kwargs}, input]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Iterable, Mapping

from prnas_jax import files, ops
from prnas_jax.errors import UserError
from prnas_jax.ops import Conv, FacConv, Pool, Skip, Spec, Zero

Entry = tuple[Spec, int]

CELLS = ('normal', 'reduce')
KEYS = ('normal', 'normal_concat', 'reduce', 'reduce_concat')
_SPECS = (Zero, Skip, Pool, Conv, FacConv)
_SHAPE = ('a JSON object with keys normal, normal_concat, reduce, reduce_concat, e.g. '
          '{"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5], ...}')
_INPUTS = 'node i may take inputs 0..i+1 (0 = c_{k-2}, 1 = c_{k-1}, j+2 = node j)'


@dataclasses.dataclass(frozen=True)
class Genotype:
  """Two ``(candidate, input)`` entries per node for each cell type, and the concat lists.

  Candidates may be given as specs or as strings (canonical or DARTS names). Each node's pair is
  sorted to ascending input index; everything else is validated (``UserError``).
  """
  normal: tuple[Entry, ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[Entry, ...]
  reduce_concat: tuple[int, ...]

  def __post_init__(self):
    for cell in CELLS:
      entries = _normalise_cell(cell, getattr(self, cell))
      object.__setattr__(self, cell, entries)
      concat = _normalise_concat(cell, getattr(self, f'{cell}_concat'), len(entries) // 2)
      object.__setattr__(self, f'{cell}_concat', concat)

  def nodes(self, cell: str) -> int:
    """The number of intermediate nodes of ``cell`` (``'normal'`` or ``'reduce'``)."""
    return len(self._cell(cell)) // 2

  def _cell(self, cell):
    if cell not in CELLS:
      raise UserError(f'unknown cell type {cell!r}: use normal or reduce')
    return getattr(self, cell)

  def to_json(self) -> dict:
    """The on-disk object, candidates in canonical spelling."""
    return self._export(str)

  def to_darts(self) -> dict | None:
    """The same object in DARTS names, or None if some candidate has no DARTS name."""
    names = {spec: ops.darts_name(spec) for cell in CELLS for spec, _ in getattr(self, cell)}
    if None in names.values():
      return None
    return self._export(names.__getitem__)

  def _export(self, name):
    out = {}
    for cell in CELLS:
      out[cell] = [[name(spec), i] for spec, i in getattr(self, cell)]
      out[f'{cell}_concat'] = list(getattr(self, f'{cell}_concat'))
    return out

  @classmethod
  def from_json(cls, obj: Any, source: str = 'genotype') -> Genotype:
    """Reads our object (canonical or DARTS names) or the reference's 4-element array.

    ``source`` (a file name) prefixes every error message.
    """
    try:
      if isinstance(obj, Mapping):
        missing = [k for k in KEYS if k not in obj]
        extra = sorted(str(k) for k in obj if k not in KEYS)
        if missing:
          raise UserError(f'the object lacks {", ".join(missing)}: write {_SHAPE}')
        if extra:
          raise UserError(f'the object has unknown keys {", ".join(extra)}: write {_SHAPE}')
        parts = [obj[k] for k in KEYS]
      elif isinstance(obj, list) and len(obj) == 4:
        parts = obj
      else:
        raise UserError(f'found {_describe(obj)}: write {_SHAPE}, or the reference\'s 4-element '
                        'array [normal, normal_concat, reduce, reduce_concat]')
      normal, normal_concat, reduce, reduce_concat = parts
      return cls(_read_cell('normal', normal), _read_concat('normal_concat', normal_concat),
                 _read_cell('reduce', reduce), _read_concat('reduce_concat', reduce_concat))
    except UserError as e:
      raise UserError(f'{source}: {e}') from None


def _describe(obj):
  if isinstance(obj, list):
    return f'a JSON array of length {len(obj)}'
  return {dict: 'a JSON object', str: 'a JSON string', bool: 'a JSON boolean', type(None): 'null'
         }.get(type(obj), f'a JSON {type(obj).__name__}')


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _normalise_cell(cell, entries):
  if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
    raise UserError(f'{cell} is {entries!r}: give a list of (candidate, input) entries')
  entries = list(entries)
  if not entries or len(entries) % 2:
    raise UserError(f'{cell} has {len(entries)} entries, so a node lacks a second input: give '
                    f'every node exactly two (candidate, input) entries')
  out = []
  for n, entry in enumerate(entries):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      raise UserError(f'{cell} entry {n} is {entry!r}: write (candidate, input)')
    spec, i = entry
    if isinstance(spec, str):
      spec = ops.parse(spec)
    if not isinstance(spec, _SPECS):
      raise UserError(f'{cell} entry {n} has candidate {spec!r}: use a spec or a candidate name')
    node = n // 2
    if not _is_int(i) or not 0 <= i < node + 2:
      raise UserError(f'{cell} node {node} takes input {i!r}, which does not exist there: '
                      f'{_INPUTS}')
    out.append((spec, int(i)))
  pairs = (sorted(out[n:n + 2], key=lambda e: e[1]) for n in range(0, len(out), 2))
  return tuple(e for pair in pairs for e in pair)


def _normalise_concat(cell, concat, nodes):
  key = f'{cell}_concat'
  if isinstance(concat, (str, bytes)) or not isinstance(concat, Iterable):
    raise UserError(f'{key} is {concat!r}: list node indices, e.g. [2, 3, 4, 5]')
  concat = tuple(int(c) if _is_int(c) else c for c in concat)
  valid = f'use node indices 2..{nodes + 1} (node i is i+2), e.g. {list(range(2, nodes + 2))}'
  if not concat:
    raise UserError(f'{key} is empty: {valid}')
  for c in concat:
    if not _is_int(c) or not 2 <= c < nodes + 2:
      raise UserError(f'{key} lists {c!r}, but the cell has {nodes} nodes: {valid}')
  if len(set(concat)) != len(concat):
    raise UserError(f'{key} {list(concat)} lists a node twice: list each node once')
  return concat


def _read_cell(cell, rows):
  if not isinstance(rows, list):
    raise UserError(f'{cell} is {_describe(rows)}: write a list of [candidate, input] pairs')
  out = []
  for n, row in enumerate(rows):
    if not (isinstance(row, list) and len(row) in (2, 3) and isinstance(row[0], str)
            and (len(row) == 2 or isinstance(row[1], dict))):
      raise UserError(f'{cell} entry {n} is {json.dumps(row)}: write [candidate, input], e.g. '
                      '["sep_conv_3x3", 0], or the reference\'s [name, {kwargs}, input]')
    if not _is_int(row[-1]):
      raise UserError(f'{cell} entry {n} has input {json.dumps(row[-1])}: use an integer '
                      '(0 = c_{k-2}, 1 = c_{k-1}, i+2 = node i)')
    try:
      spec = _reference_spec(row[0], row[1]) if len(row) == 3 else ops.parse(row[0])
    except UserError as e:
      raise UserError(f'{cell} entry {n}: {e}') from None
    out.append((spec, row[-1]))
  return out


def _read_concat(key, concat):
  if not (isinstance(concat, list) and all(_is_int(c) for c in concat)):
    raise UserError(f'{key} is {json.dumps(concat)}: write a list of node indices, '
                    'e.g. [2, 3, 4, 5]')
  return concat


_REFERENCE_KWARGS = {'conv': ('c_mul', 'k', 'dil'), 'pool': ('k', 'type_')}


def _reference_spec(name, kwargs):
  """A reference op ``[name, {kwargs}]`` (reference §2.5); other names need empty kwargs."""
  allowed = _REFERENCE_KWARGS.get(name, ())
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    fix = f'use only {", ".join(allowed)}' if allowed else 'give it empty kwargs {}'
    raise UserError(f'{name} has unknown kwargs {", ".join(unknown)}: {fix}')
  if name == 'conv':
    mul, k, dil = kwargs.get('c_mul', []), kwargs.get('k', 3), kwargs.get('dil', 1)
    if not (isinstance(mul, list) and all(_is_int(m) for m in mul)):
      raise UserError(f'conv c_mul={json.dumps(mul)} is invalid: use a list of integers >= 1')
    return Conv(k, dil, tuple(mul))
  if name == 'pool':
    if 'type_' not in kwargs:
      raise UserError('pool lacks its type_: add "type_": "max" or "avg"')
    return Pool(kwargs['type_'], kwargs.get('k', 3))
  return ops.parse(name)


def span(spec: Spec) -> int:
  """The pixels ``spec``'s window spans along each axis: ``d*(k-1)+1`` for a conv."""
  if isinstance(spec, Conv):
    return spec.d * (spec.k - 1) + 1
  return spec.k if isinstance(spec, (Pool, FacConv)) else 1


def check_fits(genotype: Genotype, size: int, source: str) -> None:
  """A one-line UserError for an op of ``genotype`` (named ``source``) whose window spans more
  than ``size``, the side of the largest feature map its cells see: it would see only padding."""
  for cell in CELLS:
    for n, (spec, _) in enumerate(getattr(genotype, cell)):
      if span(spec) > size:
        raise UserError(f'{source}: {cell} entry {n} {spec} spans {span(spec)} pixels, more than '
                        f'the {size}x{size} feature maps its cells see: use a kernel whose extent '
                        f'd*(k-1)+1 is at most {size}')


# ---------------------------------------------------------------------------------------------
# Files


def dumps(genotype: Genotype) -> str:
  """The JSON text of ``genotype``: one entry per line."""
  obj, parts = genotype.to_json(), []
  for key in KEYS:
    if key.endswith('_concat'):
      parts.append(f'  {json.dumps(key)}: {json.dumps(obj[key])}')
    else:
      rows = ',\n'.join(f'    {json.dumps(row)}' for row in obj[key])
      parts.append(f'  {json.dumps(key)}: [\n{rows}\n  ]')
  return '{\n' + ',\n'.join(parts) + '\n}\n'


def save(genotype: Genotype, path: str | os.PathLike) -> None:
  """Writes ``genotype`` as JSON, atomically."""
  with files.atomic_open(path) as f:
    f.write(dumps(genotype))


def load(name_or_path: str | os.PathLike) -> Genotype:
  """A registry cell by name (case-insensitive), or a genotype JSON file."""
  if isinstance(name_or_path, str) and name_or_path.lower() in _LOWER:
    return REGISTRY[_LOWER[name_or_path.lower()]]
  path = os.fspath(name_or_path)
  if not os.path.isfile(path):
    why = 'is a folder, not a file' if os.path.isdir(path) else 'does not exist'
    raise UserError(f'genotype {path!r} is not a registry name and {why}: use one of '
                    f'{", ".join(REGISTRY)} or the path of a genotype JSON file')
  try:
    with open(path, encoding='utf-8') as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f' (line {e.lineno}, column {e.colno}: {e.msg})' if hasattr(e, 'lineno') else ''
    raise UserError(f'{path}: not valid JSON{where}: write {_SHAPE}') from None
  return Genotype.from_json(obj, source=path)


# ---------------------------------------------------------------------------------------------
# Derivation


def derive(edge_weights: list[dict[Spec, float]], max_skip: int | None = None) -> tuple[Entry, ...]:
  """The cell of a searched supernet (docs/design.md, "Genotypes"), optionally with a skip limit.

  ``edge_weights`` holds one ``{candidate: softmax weight}`` per edge, node by node and within a
  node by input index. Per edge, strength = the largest non-``Zero`` weight; each node keeps its 2
  strongest edges (ties: lower input index) with their argmax non-``Zero`` candidate (ties: the
  first in the edge's dict order). ``max_skip`` (P-DARTS M) drops the weakest selected ``Skip``
  from its edge and re-derives until at most ``max_skip`` entries are ``Skip``.
  """
  weights = [dict(w) for w in edge_weights]
  nodes = _nodes_for_edges(len(weights))
  for w in weights:
    for spec, v in w.items():
      if not isinstance(spec, _SPECS) or not math.isfinite(float(v)):
        raise ValueError(f'edge weights must map specs to finite numbers, got {spec!r}: {v!r}')
  if max_skip is not None and max_skip < 0:
    raise ValueError(f'max_skip must be >= 0, got {max_skip}')
  while True:
    entries, edges = _derive_once(weights, nodes)
    skips = [(float(weights[e][spec]), e) for e, (spec, _) in zip(edges, entries)
             if isinstance(spec, Skip)]
    if max_skip is None or len(skips) <= max_skip:
      return entries
    _, edge = min(skips)
    del weights[edge][Skip()]


def _nodes_for_edges(count):
  nodes, edges = 0, 0
  while edges < count:
    nodes += 1
    edges += nodes + 1
  if edges != count or nodes == 0:
    raise ValueError(f'{count} edges do not form a cell: n nodes have 2+3+...+(n+1) edges '
                     '(14 for 4 nodes)')
  return nodes


def _best(weights):
  """(weight, spec) of the argmax non-zero candidate, or None."""
  best = None
  for spec, v in weights.items():
    if not isinstance(spec, Zero) and (best is None or float(v) > best[0]):
      best = (float(v), spec)
  return best


def _derive_once(weights, nodes):
  entries, edges, start = [], [], 0
  for node in range(nodes):
    ranked = []
    for j in range(node + 2):
      best = _best(weights[start + j])
      if best is not None:
        ranked.append((-best[0], j, best[1]))
    if len(ranked) < 2:
      raise ValueError(f'node {node} has {len(ranked)} incoming edge(s) with a non-zero candidate; '
                       'it needs 2')
    for _, j, spec in sorted(sorted(ranked, key=lambda r: r[:2])[:2], key=lambda r: r[1]):
      entries.append((spec, j))
      edges.append(start + j)
    start += node + 2
  return tuple(entries), edges


# ---------------------------------------------------------------------------------------------
# Registry: PR-DARTS cells (reference §7.2) and the published DARTS-family cells (§7.3).


def _conv(k, *mul):
  return Conv(k, 1, mul)


def _prdarts(normal, reduce):
  concat = (2, 3, 4, 5)
  return Genotype(tuple(normal), concat, tuple(reduce), concat)


_MAX, _SKIP = Pool('max', 3), Skip()

DL1 = _prdarts(
    normal=[(_conv(5, 1), 0), (_conv(3, 1), 1),
            (_conv(3, 1), 1), (_SKIP, 2),
            (_conv(3, 1), 1), (_SKIP, 2),
            (_SKIP, 0), (_SKIP, 2)],
    reduce=[(_conv(3, 1), 0), (_SKIP, 1),
            (_MAX, 0), (_conv(5, 1), 2),
            (_conv(3, 1), 0), (_conv(3, 1), 1),
            (_MAX, 1), (_conv(3, 1), 4)])

DL2 = _prdarts(
    normal=[(_conv(3, 1), 0), (_conv(3), 1),
            (_conv(3), 1), (_conv(7, 1), 2),
            (_SKIP, 0), (_conv(5, 1), 1),
            (_conv(3, 1), 1), (_conv(7, 1), 4)],
    reduce=[(_conv(3), 0), (_conv(3, 1), 1),
            (_conv(3, 1), 1), (_SKIP, 2),
            (_MAX, 0), (_conv(3), 3),
            (_conv(3), 0), (_SKIP, 3)])

DR = _prdarts(
    normal=[(_conv(3), 0), (_conv(3, 3), 1),
            (_conv(7, 1), 1), (_conv(5, 2), 2),
            (_SKIP, 1), (_SKIP, 3),
            (_SKIP, 0), (_SKIP, 2)],
    reduce=[(_conv(5, 2), 0), (_MAX, 1),
            (_MAX, 1), (_conv(3, 1), 2),
            (_MAX, 0), (_conv(3, 3), 2),
            (_MAX, 0), (_conv(1, 1), 3)])

UR = _prdarts(
    normal=[(_conv(3, 2), 0), (_conv(1), 1),
            (_conv(3, 1, 1, 1), 1), (_conv(5), 2),
            (_conv(1, 1), 1), (_conv(3, 1, 1), 2),
            (_conv(1, 1), 3), (_conv(5, 1, 1), 4)],
    reduce=[(_conv(7, 1), 0), (_conv(3), 1),
            (_conv(3, 1, 1), 0), (_conv(3, 1), 2),
            (_SKIP, 0), (_SKIP, 2),
            (_conv(7, 1, 1), 1), (_SKIP, 2)])

# Published cells in DARTS names, entries in the order the DARTS repository lists them.
NASNet = Genotype(
    normal=(('sep_conv_5x5', 1), ('sep_conv_3x3', 0),
            ('sep_conv_5x5', 0), ('sep_conv_3x3', 0),
            ('avg_pool_3x3', 1), ('skip_connect', 0),
            ('avg_pool_3x3', 0), ('avg_pool_3x3', 0),
            ('sep_conv_3x3', 1), ('skip_connect', 1)),
    normal_concat=(2, 3, 4, 5, 6),
    reduce=(('sep_conv_5x5', 1), ('sep_conv_7x7', 0),
            ('max_pool_3x3', 1), ('sep_conv_7x7', 0),
            ('avg_pool_3x3', 1), ('sep_conv_5x5', 0),
            ('skip_connect', 3), ('avg_pool_3x3', 2),
            ('sep_conv_3x3', 2), ('max_pool_3x3', 1)),
    reduce_concat=(4, 5, 6))

AmoebaNet = Genotype(
    normal=(('avg_pool_3x3', 0), ('max_pool_3x3', 1),
            ('sep_conv_3x3', 0), ('sep_conv_5x5', 2),
            ('sep_conv_3x3', 0), ('avg_pool_3x3', 3),
            ('sep_conv_3x3', 1), ('skip_connect', 1),
            ('skip_connect', 0), ('avg_pool_3x3', 1)),
    normal_concat=(4, 5, 6),
    reduce=(('avg_pool_3x3', 0), ('sep_conv_3x3', 1),
            ('max_pool_3x3', 0), ('sep_conv_7x7', 2),
            ('sep_conv_7x7', 0), ('avg_pool_3x3', 1),
            ('max_pool_3x3', 0), ('max_pool_3x3', 1),
            ('conv_7x1_1x7', 0), ('sep_conv_3x3', 5)),
    reduce_concat=(3, 4, 6))

DARTS_V1 = Genotype(
    normal=(('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
            ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 0), ('skip_connect', 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('max_pool_3x3', 0), ('max_pool_3x3', 1),
            ('skip_connect', 2), ('max_pool_3x3', 0),
            ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('avg_pool_3x3', 0)),
    reduce_concat=(2, 3, 4, 5))

DARTS_V2 = Genotype(
    normal=(('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('skip_connect', 0),
            ('skip_connect', 0), ('dil_conv_3x3', 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('max_pool_3x3', 0), ('max_pool_3x3', 1),
            ('skip_connect', 2), ('max_pool_3x3', 1),
            ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('max_pool_3x3', 1)),
    reduce_concat=(2, 3, 4, 5))

PDARTS = Genotype(
    normal=(('skip_connect', 0), ('dil_conv_3x3', 1),
            ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('avg_pool_3x3', 0), ('sep_conv_5x5', 1),
            ('sep_conv_3x3', 0), ('dil_conv_5x5', 2),
            ('max_pool_3x3', 0), ('dil_conv_3x3', 1),
            ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)),
    reduce_concat=(2, 3, 4, 5))

REGISTRY: dict[str, Genotype] = {
    'DL1': DL1, 'DL2': DL2, 'DR': DR, 'UR': UR, 'DARTS_V1': DARTS_V1, 'DARTS_V2': DARTS_V2,
    'PDARTS': PDARTS, 'NASNet': NASNet, 'AmoebaNet': AmoebaNet,
}
_LOWER = {name.lower(): name for name in REGISTRY}
