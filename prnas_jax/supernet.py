"""The DARTS supernet built from a search space (reference §1), its alphas, and the pure
functions that move weights between supernets of different stages.

Parameters are addressed as ``cell{i}/edge{e}/<canonical candidate string>``, so a rebuilt
supernet takes over every surviving candidate's weights by name (``carry_over``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from prnas_jax import morph, ops
from prnas_jax.ops import Spec
from prnas_jax.space import CELL_TYPES, NODES, edge_inputs

EdgeOps = tuple[tuple[Spec, ...], ...]  # per edge, the active candidates in column order


@dataclasses.dataclass(frozen=True)
class CellLayout:
  reduction: bool
  reduction_prev: bool
  channels: int


def layouts(layers: int, channels: int, reduction_prev: bool = False) -> list[CellLayout]:
  """Cells with reductions at ``layers//3`` and ``2*layers//3``; C doubles at each.
  ``reduction_prev``: the stem halves the resolution of c_{k-2} (the ImageNet stems)."""
  out, c, prev = [], channels, reduction_prev
  for i in range(layers):
    red = i in (layers // 3, 2 * layers // 3)
    c = c * 2 if red else c
    out.append(CellLayout(red, prev, c))
    prev = red
  return out


class SearchPool(nn.Module):
  """A pool candidate followed by an affine-free BatchNorm, as in DARTS' search."""
  spec: ops.Pool
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = ops.PoolOp(self.spec, self.stride)(x, train)
    return ops.batch_norm(False)(x, use_running_average=not train)


def search_op(spec: Spec, channels: int, stride: int, dw_form: str | None) -> nn.Module:
  if isinstance(spec, ops.Pool):
    return SearchPool(spec, stride, name=str(spec))
  return ops.make_op(spec, channels, stride, affine=False, dw_form=dw_form, name=str(spec))


class MixedOp(nn.Module):
  """Sum of the edge's candidates weighted by their softmax(alpha) column.

  ``skip_drop`` (a traced rate, or None for none) drops the identity skip element-wise, as
  P-DARTS does (rng stream ``'dropout'``).
  """
  candidates: tuple[Spec, ...]
  channels: int
  stride: int
  dw_form: str | None = None

  @nn.compact
  def __call__(self, x, weights, train: bool, skip_drop=None):
    out = 0.0
    for j, spec in enumerate(self.candidates):
      out = out + weights[j] * _run_candidate(self, spec, self.channels, self.stride,
                                              self.dw_form, x, train, skip_drop)
    return out


def _run_candidate(parent: nn.Module, spec, channels, stride, dw_form, x, train, skip_drop):
  """Candidate ``spec`` on ``x`` (a module named ``str(spec)`` in ``parent``'s scope), its
  identity skip dropped by ``skip_drop``."""
  y = search_op(spec, channels, stride, dw_form)(x, train)
  if skip_drop is not None and train and isinstance(spec, ops.Skip) and stride == 1:
    keep = jax.random.bernoulli(parent.make_rng('dropout'), 1.0 - skip_drop, y.shape)
    y = jnp.where(keep, y / jnp.maximum(1.0 - skip_drop, 1e-6), 0.0)
  return y


class Candidate(nn.Module):
  """One candidate of one edge as its own piece: ``weights[e, col] * candidate(x)`` with
  ``index = (e, col)`` traced, so the candidates of one spec, stride and width share a program
  across edges and cells."""
  spec: Spec
  channels: int
  stride: int
  dw_form: str | None = None

  @nn.compact
  def __call__(self, x, weights, index, train: bool, skip_drop=None):
    y = _run_candidate(self, self.spec, self.channels, self.stride, self.dw_form, x, train,
                       skip_drop)
    return weights[index[0], index[1]] * y


def _preprocess(layout: CellLayout, s0, s1, train: bool):
  """The cell's two inputs brought to C channels at its resolution (modules ``pre0``, ``pre1``
  in the calling module's scope)."""
  c = layout.channels
  if layout.reduction_prev:
    s0 = ops.FactorizedReduce(c, name='pre0')(s0, train)
  else:
    s0 = ops.ReLUConvBN(c, name='pre0')(s0, train)
  return s0, ops.ReLUConvBN(c, name='pre1')(s1, train)


def _nodes(edges: EdgeOps, layout: CellLayout, dw_form, s0, s1, weights, train, skip_drop):
  """The cell's nodes from its preprocessed inputs, concatenated (modules ``edge{e}``)."""
  states, nodes = [s0, s1], [0.0] * NODES
  for e, (node, j) in enumerate(edge_inputs()):
    stride = 2 if layout.reduction and j < 2 else 1
    y = MixedOp(edges[e], layout.channels, stride, dw_form, name=f'edge{e}')(
        states[j], weights[e], train, skip_drop)
    nodes[node] = nodes[node] + y
    if j == node + 1:  # the node's last input: it is complete
      states.append(nodes[node])
  return jnp.concatenate(states[2:], axis=-1)


def _stem(channels: int, x, train: bool):
  x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name='stem')(x)
  return ops.batch_norm(True, name='stem_bn')(x, use_running_average=not train)


def _head(num_classes: int, x):
  return nn.Dense(num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


class SearchCell(nn.Module):
  edges: EdgeOps
  layout: CellLayout
  dw_form: str | None = None

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool, skip_drop=None):
    s0, s1 = _preprocess(self.layout, s0, s1, train)
    return _nodes(self.edges, self.layout, self.dw_form, s0, s1, weights, train, skip_drop)


class Supernet(nn.Module):
  """Stem, ``layers`` search cells, global average pool, linear head."""
  normal: EdgeOps
  reduce: EdgeOps
  layers: int = 8
  channels: int = 16
  num_classes: int = 10
  stem_multiplier: int = 3
  dw_form: str | None = None
  remat: bool = False  # recompute each cell's activations in the backward pass (less memory)

  @nn.compact
  def __call__(self, x, weights: Mapping[str, jax.Array], train: bool, skip_drop=None):
    s0 = s1 = _stem(self.stem_multiplier * self.channels, x, train)
    for i, layout in enumerate(layouts(self.layers, self.channels)):
      kind = 'reduce' if layout.reduction else 'normal'
      cell_cls = nn.remat(SearchCell, static_argnums=(4,)) if self.remat else SearchCell
      cell = cell_cls(getattr(self, kind), layout, self.dw_form, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, weights[kind], train, skip_drop)
    return _head(self.num_classes, s1)

  def edge_ops(self) -> dict[str, EdgeOps]:
    return {'normal': self.normal, 'reduce': self.reduce}

  def pieces(self) -> list[tuple[str, nn.Module]]:
    """The supernet as a chain of separately applicable modules, each with the variables
    ``select(variables, name)``: ``('stem', Stem)``, per cell ``('cell{i}/pre', CellInputs)``
    and ``('cell{i}/nodes', CellNodes)`` (equal for cells of one type and width, so they share
    a compiled program), ``('head', Head)``."""
    out = [('stem', Stem(self.stem_multiplier * self.channels, parent=None))]
    for i, layout in enumerate(layouts(self.layers, self.channels)):
      kind = 'reduce' if layout.reduction else 'normal'
      out.append((f'cell{i}/pre', CellInputs(layout, parent=None)))
      out.append((f'cell{i}/nodes', CellNodes(getattr(self, kind), dataclasses.replace(
          layout, reduction_prev=False), self.dw_form, parent=None)))
    return out + [('head', Head(self.num_classes, parent=None))]


class Stem(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, train: bool):
    return _stem(self.channels, x, train)


class CellInputs(nn.Module):
  layout: CellLayout

  @nn.compact
  def __call__(self, s0, s1, train: bool):
    return _preprocess(self.layout, s0, s1, train)


class CellNodes(nn.Module):
  edges: EdgeOps
  layout: CellLayout
  dw_form: str | None = None

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool, skip_drop=None):
    return _nodes(self.edges, self.layout, self.dw_form, s0, s1, weights, train, skip_drop)


@functools.cache
def node_candidates(nodes: CellNodes) -> list[list[tuple[int, int, int, Candidate]]]:
  """Per node of ``nodes``, its candidates in the order the cell adds them up:
  ``(edge, input state, column, Candidate)``; states are ``[s0, s1, node0, ...]``."""
  out = [[] for _ in range(NODES)]
  for e, (node, j) in enumerate(edge_inputs()):
    stride = 2 if nodes.layout.reduction and j < 2 else 1
    out[node] += [(e, j, col, Candidate(spec, nodes.layout.channels, stride, nodes.dw_form,
                                        parent=None))
                  for col, spec in enumerate(nodes.edges[e])]
  return out


class Head(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return _head(self.num_classes, x)


_PIECE_KEYS = {'stem': ('stem', 'stem_bn'), 'head': ('head',), 'pre': ('pre0', 'pre1')}


def select(tree, piece: str) -> dict:
  """The part of a ``params`` or ``batch_stats`` tree that belongs to ``piece`` (a name from
  ``Supernet.pieces``, or ``cell{i}/edge{e}/<candidate>``)."""
  if piece in ('stem', 'head'):
    return {k: tree[k] for k in _PIECE_KEYS[piece] if k in tree}
  cell, part, *spec = piece.split('/')
  sub = tree.get(cell, {})
  if spec:
    edge = sub.get(part, {})
    return {spec[0]: edge[spec[0]]} if spec[0] in edge else {}
  if part == 'pre':
    return {k: v for k, v in sub.items() if k in _PIECE_KEYS['pre']}
  return {k: v for k, v in sub.items() if k not in _PIECE_KEYS['pre']}


def merge(parts: Mapping[str, dict]) -> dict:
  """The inverse of ``select``: one tree from every piece's part."""
  out = {}
  for piece, sub in parts.items():
    cell, *part = piece.split('/')
    if len(part) == 2:  # a candidate: cell/edge/spec
      if sub:
        out.setdefault(cell, {}).setdefault(part[0], {}).update(sub)
    elif part:
      out.setdefault(cell, {}).update(sub)
    else:
      out.update(sub)
  return out


def build(space, **kwargs) -> Supernet:
  """The supernet of a search space (``{'normal': CellSpace, 'reduce': CellSpace}``)."""
  return Supernet(space['normal'].active_specs(), space['reduce'].active_specs(), **kwargs)


# ------------------------------------------------------------------------------ alphas


def alpha_masks(edge_ops: Mapping[str, EdgeOps]) -> dict[str, np.ndarray]:
  """Per cell type a (edges, width) bool mask; width = the most candidates on one edge."""
  masks = {}
  for kind in CELL_TYPES:
    width = max(len(c) for c in edge_ops[kind])
    masks[kind] = np.array([[j < len(c) for j in range(width)] for c in edge_ops[kind]])
  return masks


def init_alphas(key, masks: Mapping[str, np.ndarray], scale: float = 1e-3) -> dict[str, jax.Array]:
  """``scale * N(0, 1)`` on real columns, exactly zero on masked ones."""
  keys = dict(zip(CELL_TYPES, jax.random.split(key, len(CELL_TYPES))))
  return {k: scale * jax.random.normal(keys[k], m.shape) * m for k, m in masks.items()}


def init_variables(net: Supernet, key, image_shape) -> dict:
  """Freshly initialised ``params`` and ``batch_stats`` of ``net`` for images of ``image_shape``
  (H, W, C)."""
  masks = alpha_masks(net.edge_ops())
  weights = edge_weights(init_alphas(jax.random.key(0), masks), masks)
  return net.init(key, jnp.zeros((1, *image_shape), jnp.float32), weights, train=False)


def edge_weights(alphas: Mapping[str, jax.Array], masks: Mapping[str, np.ndarray]):
  """Softmax over each edge's real columns; masked columns get probability and gradient 0."""
  return {k: jax.nn.softmax(jnp.where(masks[k], a, -jnp.inf), axis=-1, where=masks[k])
          for k, a in alphas.items()}


# ------------------------------------------------------------------------------ weights


def carry_over(old_vars, new_template):
  """``new_template`` with every leaf that ``old_vars`` has under the same name and shape
  replaced by the old value."""
  old = traverse_util.flatten_dict(old_vars)
  new = traverse_util.flatten_dict(new_template)
  return traverse_util.unflatten_dict({
      k: old[k] if k in old and np.shape(old[k]) == np.shape(v) else v for k, v in new.items()})


def _candidate(variables, cell: int, edge: int, spec: Spec):
  return {col: variables[col][f'cell{cell}'][f'edge{edge}'][str(spec)]
          for col in ('params', 'batch_stats')}


def _set_candidate(variables, cell: int, edge: int, spec: Spec, sub):
  out = dict(variables)
  for col in ('params', 'batch_stats'):
    cells = dict(out[col])
    edges = dict(cells[f'cell{cell}'])
    edges[f'edge{edge}'] = {**edges[f'edge{edge}'], str(spec): sub[col]}
    cells[f'cell{cell}'] = edges
    out[col] = cells
  return out


def init_from_parents(variables, net: Supernet,
                      transfers: Mapping[str, Sequence[tuple[int, Spec, Spec]]], key):
  """Initialises each ``(edge, parent, child)`` of each cell type in every cell of that type
  from the parent's weights with the morph transfer functions, in the given order."""
  for i, layout in enumerate(layouts(net.layers, net.channels)):
    kind = 'reduce' if layout.reduction else 'normal'
    for edge, parent, child in transfers.get(kind, ()):
      key, sub = jax.random.split(key)
      child_vars = morph.transfer(_candidate(variables, i, edge, parent), parent, child,
                                  layout.channels, sub)
      # own buffers: the transfers may pass parent arrays through, and state buffers are donated
      variables = _set_candidate(variables, i, edge, child, jax.tree.map(jnp.copy, child_vars))
  return variables
