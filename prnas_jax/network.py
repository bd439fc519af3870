"""The networks a genotype is retrained in (reference §8): the CIFAR network (3x3 stem, 20 cells,
C=36) and the ImageNet mobile network (two stride-2 stems, 14 cells, C=48), both with an optional
auxiliary head after the second reduction.

Cells are built from the same candidate modules as the supernet (``ops.make_op``, affine BN).
Drop-path multiplies every op output except the stride-1 identity by a per-sample Bernoulli mask
(rng stream ``'drop_path'``); its rate is a traced argument, so the ramp never recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from prnas_jax import cells, ops
from prnas_jax.cells import CellLayout
from prnas_jax.genotype import Entry, Genotype
from prnas_jax.pieces import Piece


def drop_path(x, rate, key):
  """Zeroes whole samples with probability ``rate`` and rescales the rest by ``1/(1-rate)``."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, 0.0)


class Cell(nn.Module):
  """A genotype cell: each node sums its two ops; the output concatenates the ``concat`` nodes."""
  entries: tuple[Entry, ...]
  concat: tuple[int, ...]
  layout: CellLayout
  dw_form: str | None = None

  @nn.compact
  def __call__(self, s0, s1, train: bool, drop_rate=0.0):
    states = list(cells.preprocess(self.layout, s0, s1, train, affine=True))
    for node in range(len(self.entries) // 2):
      total = 0.0
      for slot in range(2):
        spec, j = self.entries[2 * node + slot]
        stride = self.layout.stride(j)
        y = ops.make_op(spec, self.layout.channels, stride, affine=True, dw_form=self.dw_form,
                        name=f'node{node}_{slot}')(states[j], train)
        if train and not (isinstance(spec, ops.Skip) and stride == 1):
          y = drop_path(y, drop_rate, self.make_rng('drop_path'))
        total = total + y
      states.append(total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxHead(nn.Module):
  """ReLU, 5x5 average pool (no padding), 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU,
  linear; on the 8x8 (CIFAR, pool stride 3) or 7x7 (ImageNet, stride 2) map after cell 2L/3."""
  num_classes: int
  pool_stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.avg_pool(nn.relu(x), (5, 5), (self.pool_stride,) * 2)
    x = ops.pointwise(128, name='conv1')(x)
    x = nn.relu(ops.batch_norm(True, 'bn1')(x, use_running_average=not train))
    x = nn.Conv(768, (2, 2), padding='VALID', use_bias=False, name='conv2')(x)
    x = nn.relu(ops.batch_norm(True, 'bn2')(x, use_running_average=not train))
    return nn.Dense(self.num_classes, name='head')(x.reshape(x.shape[0], -1))


def runs(layouts: list[CellLayout], genotype: Genotype, stem: str, channels: int,
         stem_multiplier: int, stop_after: int) -> list[range]:
  """The cells as maximal runs of consecutive cells that compute the same function of inputs of
  the same shapes (one layout, one input resolution and width), each run a ``range`` of cell
  indices; a run ends at cell ``stop_after`` (where the auxiliary head reads)."""
  if stem == 'cifar':
    shapes = [(1, stem_multiplier * channels)] * 2  # (downsampling, channels) of c_{k-2}, c_{k-1}
  else:
    shapes = [(4, channels), (8, channels)]
  out, key = [], None
  for i, layout in enumerate(layouts):
    cell_key = (layout, *shapes)
    if out and cell_key == key and out[-1][-1] != stop_after:
      out[-1] = range(out[-1].start, i + 1)
    else:
      out.append(range(i, i + 1))
    key = cell_key
    width = len(getattr(genotype, f'{layout.kind}_concat')) * layout.channels
    shapes = [shapes[1], (shapes[1][0] * (2 if layout.reduction else 1), width)]
  return out


class Network(nn.Module):
  """A genotype stacked into ``layers`` cells; returns ``(logits, aux_logits)`` where the
  auxiliary logits are None unless training with ``auxiliary``.

  ``scan_cells``: each run of like cells (``runs``) is one ``lax.scan`` over the run's weights,
  stacked when the network is applied, so the program holds each distinct cell once (a shorter
  compile; on a CPU a slower step, docs/design.md, "Scanned cells") while the variables keep
  their per-cell names (``cell{i}``)."""
  genotype: Genotype
  layers: int = 20
  channels: int = 36
  num_classes: int = 10
  auxiliary: bool = True
  stem: str = 'cifar'
  stem_multiplier: int = 3
  dw_form: str | None = None
  remat: bool = False  # recompute each cell's activations in the backward pass (less memory)
  scan_cells: bool = False

  @nn.compact
  def __call__(self, x, train: bool, drop_rate=0.0):
    s0, s1 = cells.stem(self.stem, self.channels, self.stem_multiplier, x, train)
    aux = None
    aux_cell = 2 * self.layers // 3
    layouts = cells.layouts(self.layers, self.channels, reduction_prev=self.stem != 'cifar')
    scan = self.scan_cells and not self.is_initializing()
    for run in runs(layouts, self.genotype, self.stem, self.channels, self.stem_multiplier,
                    aux_cell):
      if scan and len(run) > 1:
        s0, s1 = self._scan(run, layouts[run.start], s0, s1, train, drop_rate)
      else:
        for i in run:
          s0, s1 = s1, self._cell(layouts[i], self.remat, name=f'cell{i}')(s0, s1, train,
                                                                           drop_rate)
      if run[-1] == aux_cell and self.auxiliary and train:
        aux = AuxHead(self.num_classes, 3 if self.stem == 'cifar' else 2, name='aux')(s1, train)
    return cells.classifier(self.num_classes, s1), aux

  def _cell(self, layout: CellLayout, remat: bool = False, **kw) -> Cell:
    """A cell of ``layout`` (with ``remat``: recomputed in the backward pass)."""
    cell_cls = nn.remat(Cell, static_argnums=(3,)) if remat else Cell
    return cell_cls(getattr(self.genotype, layout.kind),
                    getattr(self.genotype, f'{layout.kind}_concat'), layout, self.dw_form, **kw)

  def pieces(self) -> list[Piece]:
    """The network in training as a chain of pieces (``pieces``; docs/design.md, "Program
    layouts"): ``images`` in, the stem (``stem``; ImageNet's ``stem0`` and ``stem1``), each cell
    ``cell{i}`` (the cells of one run, ``runs``, are equal modules on inputs of equal shapes:
    they share their programs), the auxiliary head (``aux_logits``, with ``auxiliary``), and last
    the classifier ``head`` (``logits``), which the loss applies."""
    layouts = cells.layouts(self.layers, self.channels, reduction_prev=self.stem != 'cifar')
    width = self.stem_multiplier * self.channels if self.stem == 'cifar' else self.channels
    s0, s1 = ('stem', 'stem') if self.stem == 'cifar' else ('stem0', 'stem1')
    out = [Piece('stem', cells.Stem(width, self.stem, parent=None), ('images',),
                 tuple(dict.fromkeys((s0, s1))), keys=cells.STEM_KEYS[self.stem])]
    for i, layout in enumerate(layouts):
      nodes = len(getattr(self.genotype, layout.kind)) // 2
      keys = ('pre0', 'pre1') + tuple(f'node{n}_{slot}' for n in range(nodes) for slot in (0, 1))
      out.append(Piece(f'cell{i}', self._cell(layout, parent=None), (s0, s1), (f'cell{i}',),
                       (f'cell{i}',), keys, rate='drop_rate'))
      s0, s1 = s1, f'cell{i}'
      if i == 2 * self.layers // 3 and self.auxiliary:
        out.append(Piece('aux', AuxHead(self.num_classes, 3 if self.stem == 'cifar' else 2,
                                        parent=None), (s1,), ('aux_logits',), ('aux',),
                         ('conv1', 'bn1', 'conv2', 'bn2', 'head')))
    return out + [Piece('head', cells.Head(self.num_classes, parent=None), (s1,), ('logits',),
                        keys=('head',))]

  def _scan(self, run: range, layout: CellLayout, s0, s1, train: bool, drop_rate):
    """The cells of ``run`` (of ``layout``) applied in turn as one ``lax.scan``; their new
    batch statistics are written back under each cell's name."""
    cell = self._cell(layout, self.remat, parent=None)
    cols = [c for c in ('params', 'batch_stats') if c in self.variables]
    stacked = {c: jax.tree.map(lambda *v: jnp.stack(v),
                               *[self.variables[c][f'cell{i}'] for i in run]) for c in cols}
    keys = jax.random.split(self.make_rng('drop_path'), len(run)) if train else None
    mutable = ['batch_stats'] if train else False

    def body(carry, xs):
      variables, key = xs
      a, b = carry
      out = cell.apply(variables, a, b, train, drop_rate, mutable=mutable,
                       rngs=None if key is None else {'drop_path': key})
      y, new = out if train else (out, {})
      return (b, y), new.get('batch_stats')

    (s0, s1), stats = jax.lax.scan(body, (s0, s1), (stacked, keys))
    if train and stats is not None and self.is_mutable_collection('batch_stats'):
      for n, i in enumerate(run):
        self.put_variable('batch_stats', f'cell{i}', jax.tree.map(lambda v: v[n], stats))
    return s0, s1


def param_count(params) -> int:
  """The number of parameters outside the auxiliary head (the papers' figure)."""
  flat = traverse_util.flatten_dict(params)
  return sum(int(v.size) for k, v in flat.items() if k[0] != 'aux')


def variable_shapes(net: Network, image_shape) -> dict:
  """Shapes of ``net``'s variables (training mode, so the auxiliary head is included), without
  running or compiling anything."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'drop_path': jax.random.key(1)}
  return jax.eval_shape(lambda r, x: net.init(r, x, train=True), rngs, x)
