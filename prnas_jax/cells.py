"""The skeleton every network of the project shares (reference §1, §8; docs/design.md, "Cells"):
where the reduction cells sit and how wide each cell is, the stride rule, the two inputs'
preprocessing, the stems and the classifier head.

The search supernet (``supernet``) and the retraining networks (``network``) differ only in what
a cell computes between its preprocessed inputs and its output: a weighted mixture of every
candidate on every edge, or a genotype's two ops per node.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from prnas_jax import ops

STEMS = ('cifar', 'imagenet')


@dataclasses.dataclass(frozen=True)
class CellLayout:
  reduction: bool
  reduction_prev: bool  # c_{k-2} has twice the resolution of the cell's inputs
  channels: int

  @property
  def kind(self) -> str:
    """The cell type, ``'normal'`` or ``'reduce'``: it names the cell's candidates or genotype."""
    return 'reduce' if self.reduction else 'normal'

  def stride(self, state: int) -> int:
    """The stride of an op that reads ``state`` (0 = c_{k-2}, 1 = c_{k-1}, j+2 = node j):
    a reduction cell halves the resolution on the edges from its inputs."""
    return 2 if self.reduction and state < 2 else 1


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


def preprocess(layout: CellLayout, s0, s1, train: bool, affine: bool):
  """The cell's inputs brought to C channels at its resolution: modules ``pre0`` and ``pre1`` in
  the calling module's scope (FactorizedReduce for c_{k-2} after a reduction, else ReLU-conv-BN)."""
  c = layout.channels
  pre0 = ops.FactorizedReduce if layout.reduction_prev else ops.ReLUConvBN
  return (pre0(c, affine, name='pre0')(s0, train),
          ops.ReLUConvBN(c, affine, name='pre1')(s1, train))


def conv_bn(x, features: int, stride: int, name: str, train: bool):
  """3x3 convolution (``name``) and affine BatchNorm (``name_bn``)."""
  x = nn.Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
              name=name)(x)
  return ops.batch_norm(True, f'{name}_bn')(x, use_running_average=not train)


def stem(kind: str, channels: int, multiplier: int, x, train: bool):
  """The first cell's inputs ``(c_{k-2}, c_{k-1})``. ``'cifar'``: one 3x3 convolution to
  ``multiplier * C`` for both. ``'imagenet'``: two stride-2 convolutions to C/2 and C, then one
  more for c_{k-1} (1/8 of the resolution; the first cell's c_{k-2} has twice that)."""
  if kind == 'cifar':
    s = conv_bn(x, multiplier * channels, 1, 'stem', train)
    return s, s
  s0 = conv_bn(nn.relu(conv_bn(x, channels // 2, 2, 'stem0a', train)), channels, 2, 'stem0b',
               train)
  return s0, conv_bn(nn.relu(s0), channels, 2, 'stem1', train)


def classifier(num_classes: int, x):
  """Global average pooling and a linear layer (``head``)."""
  return nn.Dense(num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


class CellInputs(nn.Module):
  """``preprocess`` as a module of its own (a supernet piece)."""
  layout: CellLayout
  affine: bool = False

  @nn.compact
  def __call__(self, s0, s1, train: bool):
    return preprocess(self.layout, s0, s1, train, self.affine)


STEM_KEYS = {'cifar': ('stem', 'stem_bn'),  # the stems' variables (``stem``'s module names)
             'imagenet': ('stem0a', 'stem0a_bn', 'stem0b', 'stem0b_bn', 'stem1', 'stem1_bn')}


class Stem(nn.Module):
  """``stem`` as a module of its own (a piece): the CIFAR stem's one output to ``channels``
  (``c_{k-2} = c_{k-1}``), or the ImageNet stems' two for a network of C = ``channels``."""
  channels: int
  kind: str = 'cifar'

  @nn.compact
  def __call__(self, x, train: bool):
    s0, s1 = stem(self.kind, self.channels, 1, x, train)
    return s0 if self.kind == 'cifar' else (s0, s1)


class Head(nn.Module):
  """``classifier`` as a module of its own (a supernet piece)."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return classifier(self.num_classes, x)
