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


class Network(nn.Module):
  """A genotype stacked into ``layers`` cells; returns ``(logits, aux_logits)`` where the
  auxiliary logits are None unless training with ``auxiliary``."""
  genotype: Genotype
  layers: int = 20
  channels: int = 36
  num_classes: int = 10
  auxiliary: bool = True
  stem: str = 'cifar'
  stem_multiplier: int = 3
  dw_form: str | None = None
  remat: bool = False  # recompute each cell's activations in the backward pass (less memory)

  @nn.compact
  def __call__(self, x, train: bool, drop_rate=0.0):
    s0, s1 = cells.stem(self.stem, self.channels, self.stem_multiplier, x, train)
    aux = None
    cell_cls = nn.remat(Cell, static_argnums=(3,)) if self.remat else Cell
    for i, layout in enumerate(cells.layouts(self.layers, self.channels,
                                             reduction_prev=self.stem != 'cifar')):
      cell = cell_cls(getattr(self.genotype, layout.kind),
                      getattr(self.genotype, f'{layout.kind}_concat'), layout, self.dw_form,
                      name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train, drop_rate)
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        aux = AuxHead(self.num_classes, 3 if self.stem == 'cifar' else 2, name='aux')(s1, train)
    return cells.classifier(self.num_classes, s1), aux


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
