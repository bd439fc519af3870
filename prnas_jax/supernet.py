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

from prnas_jax import cells, initialize, morph, ops, pieces
from prnas_jax.cells import CellLayout
from prnas_jax.ops import Spec
from prnas_jax.pieces import Piece, merge
from prnas_jax.space import CELL_TYPES, NODES, edge_inputs

EdgeOps = tuple[tuple[Spec, ...], ...]  # per edge, the active candidates in column order


class SearchPool(nn.Module):
  """A pool candidate followed by an affine-free BatchNorm, as in DARTS' search."""
  spec: ops.Pool
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = ops.PoolOp(self.spec, self.stride)(x, train)
    return ops.batch_norm(False)(x, use_running_average=not train)


def search_op(spec: Spec, channels: int, stride: int, dw_form: str | None, groups: int = 1,
              **module) -> nn.Module:
  """Candidate ``spec``'s module in the search (named ``str(spec)`` unless ``module`` names it
  or gives its parent; ``groups`` as in ``ops.make_op``)."""
  module.setdefault('name', str(spec))
  if isinstance(spec, ops.Pool):
    return SearchPool(spec, stride, **module)
  return ops.make_op(spec, channels, stride, affine=False, dw_form=dw_form, groups=groups,
                     **module)


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
    return _mix(self, x, weights, train, skip_drop)


def _mix(op: MixedOp, x, weights, train: bool, skip_drop):
  """The sum of ``op``'s candidates on ``x`` weighted by ``weights`` (modules in its scope)."""
  out = 0.0
  for j, spec in enumerate(op.candidates):
    out = out + weights[j] * _run_candidate(op, spec, op.channels, op.stride, op.dw_form, x,
                                            train, skip_drop)
  return out


class Edge(MixedOp):
  """One edge as its own piece: ``MixedOp`` with row ``index[0]`` of the edge weights, traced,
  so the edges with the same candidates, stride and width share a program across edges and
  cells."""

  @nn.compact
  def __call__(self, x, weights, index, train: bool, skip_drop=None):
    return _mix(self, x, weights[index[0]], train, skip_drop)


def _run_candidate(parent: nn.Module, spec, channels, stride, dw_form, x, train, skip_drop):
  """Candidate ``spec`` on ``x`` (a module named ``str(spec)`` in ``parent``'s scope), its
  identity skip dropped by ``skip_drop``."""
  return _skip_dropped(parent, spec, stride, search_op(spec, channels, stride, dw_form)(x, train),
                       train, skip_drop)


def _skip_dropped(parent: nn.Module, spec, stride, y, train, skip_drop):
  """``y``, the output of candidate ``spec``, with the identity skip dropped by ``skip_drop``."""
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


def _nodes(cell: nn.Module, s0, s1, weights, train, skip_drop):
  """The nodes of ``cell`` (a ``SearchCell`` or ``CellNodes``) from its preprocessed inputs,
  concatenated (modules ``edge{e}``); with ``cell.fuse_edges`` each node as ``_fused_node``."""
  edges, layout, dw_form = cell.edges, cell.layout, cell.dw_form
  if cell.fuse_edges and not cell.is_initializing():
    states = [s0, s1]
    for node in range(NODES):
      states.append(_fused_node(cell, node, states, weights, train, skip_drop))
    return jnp.concatenate(states[2:], axis=-1)
  states, nodes = [s0, s1], [0.0] * NODES
  for e, (node, j) in enumerate(edge_inputs()):
    y = MixedOp(edges[e], layout.channels, layout.stride(j), dw_form, name=f'edge{e}')(
        states[j], weights[e], train, skip_drop)
    nodes[node] = nodes[node] + y
    if j == node + 1:  # the node's last input: it is complete
      states.append(nodes[node])
  return jnp.concatenate(states[2:], axis=-1)


def _fused_node(cell: nn.Module, node: int, states, weights, train, skip_drop):
  """Node ``node`` of ``cell`` with the candidates of one spec and stride on its incoming edges
  computed side by side: their inputs concatenated along channels, one module of that many
  groups (``ops.make_op``) applied with the edges' variables side by side, its outputs weighted
  by the edges' weights and summed. New batch statistics go back under each edge's name."""
  c, stride_of = cell.layout.channels, cell.layout.stride
  groups = {}
  for e, (n, j) in enumerate(edge_inputs()):
    if n == node:
      for col, spec in enumerate(cell.edges[e]):
        key = (spec, stride_of(j)) if not isinstance(spec, ops.FacConv) else (spec, e)
        groups.setdefault(key, []).append((e, j, col))
  mutable = train and cell.is_mutable_collection('batch_stats')
  total, new_stats = 0.0, {}
  for (spec, _), members in groups.items():
    stride, g = stride_of(members[0][1]), len(members)
    x = jnp.concatenate([states[j] for _, j, _ in members], axis=-1)
    variables = {col: jax.tree.map(lambda *v: jnp.concatenate(v, axis=-1), *trees)
                 for col in ('params', 'batch_stats')
                 if (trees := [cell.variables.get(col, {}).get(f'edge{e}', {}).get(str(spec))
                               for e, _, _ in members])[0] is not None}
    op = search_op(spec, c, stride, cell.dw_form, groups=g, parent=None)
    y = op.apply(variables, x, train, mutable=['batch_stats'] if mutable else False)
    if mutable:
      y, new = y
      if 'batch_stats' in new:
        parts = jax.tree.map(lambda v: v.reshape(*v.shape[:-1], g, -1), new['batch_stats'])
        for i, (e, _, _) in enumerate(members):
          new_stats.setdefault(f'edge{e}', {})[str(spec)] = jax.tree.map(
              lambda v, i=i: v[..., i, :], parts)
    y = _skip_dropped(cell, spec, stride, y, train, skip_drop)
    w = jnp.stack([weights[e][col] for e, _, col in members])
    total = total + jnp.sum(y.reshape(*y.shape[:3], g, c) * w[:, None], axis=-2)
  for name, stats in new_stats.items():
    cell.put_variable('batch_stats', name, {**cell.variables['batch_stats'][name], **stats})
  return total


class SearchCell(nn.Module):
  edges: EdgeOps
  layout: CellLayout
  dw_form: str | None = None
  fuse_edges: bool = False

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool, skip_drop=None):
    s0, s1 = cells.preprocess(self.layout, s0, s1, train, affine=False)
    return _nodes(self, s0, s1, weights, train, skip_drop)


class CellNodes(nn.Module):
  """A search cell after its preprocessing (a piece): equal for the cells of one type and width,
  which therefore share its compiled programs."""
  edges: EdgeOps
  layout: CellLayout
  dw_form: str | None = None
  fuse_edges: bool = False

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool, skip_drop=None):
    return _nodes(self, s0, s1, weights, train, skip_drop)


class Concat(nn.Module):
  """A cell's output from its nodes (a piece of the per-candidate layout)."""

  def __call__(self, *nodes, train: bool):
    del train
    return jnp.concatenate(nodes, axis=-1)


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
  fuse_edges: bool = False  # a node's candidates of one spec on its edges side by side

  @nn.compact
  def __call__(self, x, weights: Mapping[str, jax.Array], train: bool, skip_drop=None):
    s0, s1 = cells.stem('cifar', self.channels, self.stem_multiplier, x, train)
    cell_cls = nn.remat(SearchCell, static_argnums=(4,)) if self.remat else SearchCell
    for i, layout in enumerate(self.layouts()):
      cell = cell_cls(getattr(self, layout.kind), layout, self.dw_form, self.fuse_edges,
                      name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, weights[layout.kind], train, skip_drop)
    return cells.classifier(self.num_classes, s1)

  def layouts(self) -> list[CellLayout]:
    return cells.layouts(self.layers, self.channels)

  def edge_ops(self) -> dict[str, EdgeOps]:
    return {'normal': self.normal, 'reduce': self.reduce}

  def pieces(self, programs: str = 'pieces') -> list[Piece]:
    """The supernet as a chain of pieces over named values: ``images`` and ``weights/<kind>``
    (the edge weights of a cell type) in, ``logits`` out of the last piece, the head.

    ``stem``, then per cell ``cell{i}/pre`` (its inputs, ``cell{i}/s0`` and ``cell{i}/s1``) and
    ``cell{i}/nodes`` (its output ``cell{i}``), then ``head``. With ``programs='edges'`` each
    cell's nodes are one piece per edge, ``cell{i}/edge{e}`` (adding into ``cell{i}/node{k}``),
    and ``cell{i}/concat``; with ``'candidates'`` one piece per candidate of every edge,
    ``cell{i}/edge{e}/<spec>``. These modules are equal for every edge and cell with the same
    candidates (spec), stride and width."""
    out = [Piece('stem', cells.Stem(self.stem_multiplier * self.channels, parent=None),
                 ('images',), ('stem',), keys=cells.STEM_KEYS['cifar'])]
    s0, s1 = 'stem', 'stem'
    for i, layout in enumerate(self.layouts()):
      cell, edges = f'cell{i}', getattr(self, layout.kind)
      out.append(Piece(f'{cell}/pre', cells.CellInputs(layout, parent=None), (s0, s1),
                       (f'{cell}/s0', f'{cell}/s1'), (cell,), ('pre0', 'pre1')))
      weights = weights_value(layout.kind)
      if programs == 'pieces':
        nodes = CellNodes(edges, dataclasses.replace(layout, reduction_prev=False), self.dw_form,
                          self.fuse_edges, parent=None)
        out.append(Piece(f'{cell}/nodes', nodes, (f'{cell}/s0', f'{cell}/s1', weights), (cell,),
                         (cell,), tuple(f'edge{e}' for e in range(len(edges))), rate='skip_drop'))
      else:
        out += _edge_pieces(cell, edges, layout, self.dw_form, weights, programs)
      s0, s1 = s1, cell
    return out + [Piece('head', cells.Head(self.num_classes, parent=None), (s1,), ('logits',),
                        keys=('head',))]


def _edge_pieces(cell: str, edges: EdgeOps, layout: CellLayout, dw_form, weights: str,
                 programs: str) -> list[Piece]:
  """A cell's nodes as pieces (``Supernet.pieces``): one per edge (``programs='edges'``) or per
  candidate of every edge, node by node, then the concatenation."""
  states = [f'{cell}/s0', f'{cell}/s1'] + [f'{cell}/node{k}' for k in range(NODES)]
  out = []
  for e, (node, j) in enumerate(edge_inputs()):
    args = (layout.channels, layout.stride(j), dw_form)
    if programs == 'edges':
      parts = [(f'{cell}/edge{e}', Edge(edges[e], *args, parent=None), tuple(map(str, edges[e])),
                (e,))]
    else:
      parts = [(f'{cell}/edge{e}/{spec}', Candidate(spec, *args, parent=None), (str(spec),),
                (e, col)) for col, spec in enumerate(edges[e])]
    out += [Piece(name, module, (states[j], weights), (states[2 + node],), (cell, f'edge{e}'), keys,
                  index, rate='skip_drop') for name, module, keys, index in parts]
  return out + [Piece(f'{cell}/concat', Concat(parent=None), tuple(states[2:]), (cell,))]


def weights_value(kind: str) -> str:
  """The name of cell type ``kind``'s edge weights among the values of ``Supernet.pieces``."""
  return f'weights/{kind}'


def chain_inputs(images, weights: Mapping[str, jax.Array]) -> dict:
  """The values ``Supernet.pieces`` starts from: the images and each cell type's edge weights."""
  return {'images': images} | {weights_value(k): w for k, w in weights.items()}


def build(space, dw_form: str | None = None, **kwargs) -> Supernet:
  """The supernet of a search space (``{'normal': CellSpace, 'reduce': CellSpace}``); its
  depthwise form ``dw_form``, or if that is empty the backend's for a search."""
  return Supernet(space['normal'].active_specs(), space['reduce'].active_specs(),
                  dw_form=dw_form or ops.default_dw_form(search=True), **kwargs)


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


def variable_shapes(net: Supernet, image_shape) -> dict:
  """Shapes of ``net``'s ``params`` and ``batch_stats`` for images of ``image_shape`` (H, W, C),
  from traces: nothing runs or compiles. The per-candidate chain (``Supernet.pieces``) is walked
  with abstract values, one abstract ``init`` per distinct piece (module and input shapes), so
  the candidates of one spec, stride and width are traced once, not once per edge and cell."""
  masks = alpha_masks(net.edge_ops())
  weights = jax.eval_shape(lambda: edge_weights(init_alphas(jax.random.key(0), masks), masks))
  inits, parts = {}, []

  def apply(_, piece, inputs):
    if (piece.module, inputs) not in inits:
      inits[piece.module, inputs] = jax.eval_shape(lambda x: piece.module.init_with_output(
          jax.random.key(0), *x, *pieces.constants(piece), train=False), inputs)
    out, variables = inits[piece.module, inputs]
    parts.append((piece, variables))
    return out

  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  *body, head = net.pieces('candidates')
  values = pieces.forward(body, chain_inputs(images, weights), apply,
                          lambda program, *args, **static: jax.eval_shape(
                              functools.partial(program, **static), *args))
  parts.append((head, jax.eval_shape(lambda x: head.module.init(jax.random.key(0), x),
                                     values[head.inputs[0]])))
  return {col: merge((piece, variables.get(col, {})) for piece, variables in parts)
          for col in ('params', 'batch_stats')}


def init_variables(net: Supernet, key, image_shape) -> dict:
  """Freshly initialised ``params`` and ``batch_stats`` of ``net`` for images of
  ``image_shape``, drawn as ``net.init`` draws them but with nothing of the forward pass run or
  compiled (``initialize.variables``)."""
  return initialize.variables(variable_shapes(net, image_shape), key)


def edge_probs(space, alphas, net: Supernet) -> dict[str, list[dict[int, float]]]:
  """Per cell type and edge of ``space`` (``net``'s): ``{column: softmax weight}`` of the active
  candidates."""
  w = jax.device_get(edge_weights(alphas, alpha_masks(net.edge_ops())))
  return {kind: [dict(zip(cell.active(e), map(float, w[kind][e]))) for e in range(cell.num_edges)]
          for kind, cell in space.items()}


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
  for i, layout in enumerate(net.layouts()):
    for edge, parent, child in transfers.get(layout.kind, ()):
      key, sub = jax.random.split(key)
      child_vars = morph.transfer(_candidate(variables, i, edge, parent), parent, child,
                                  layout.channels, sub)
      # own buffers: the transfers may pass parent arrays through, and state buffers are donated
      variables = _set_candidate(variables, i, edge, child, jax.tree.map(jnp.copy, child_vars))
  return variables
