"""Candidate operations: immutable specs with canonical names, and their Flax modules (NHWC).

Families (reference §2): ``none``, ``pool(max|avg,k)``, ``skip`` (identity, or a FactorizedReduce
when strided) and ``conv(k=K,d=D,mul=[...])``, a stack of ``len(mul)+1`` separable units
(ReLU -> depthwise KxK dilation D -> pointwise 1x1 -> BatchNorm) with hidden widths ``C*m``;
``fac_conv(K)`` is AmoebaNet's ``conv_7x1_1x7`` (registry cells only, not searched).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import ClassVar, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prnas_jax.errors import UserError

ALLOWED_NAMES = ('none', 'skip', 'pool(max,K)', 'pool(avg,K)', 'conv(k=K,d=D,mul=[M,...])',
                 'fac_conv(K)',
                 'or a DARTS name such as sep_conv_3x3, dil_conv_5x5, max_pool_3x3, skip_connect')


@dataclasses.dataclass(frozen=True)
class Zero:
  """The zero operation (DARTS ``none``)."""
  family: ClassVar[str] = 'none'
  morphable: ClassVar[bool] = False

  def __str__(self):
    return 'none'

  @property
  def label(self):
    return 'Zero()'


@dataclasses.dataclass(frozen=True)
class Skip:
  """Identity; a FactorizedReduce when the edge is strided."""
  family: ClassVar[str] = 'skip'
  morphable: ClassVar[bool] = False

  def __str__(self):
    return 'skip'

  @property
  def label(self):
    return 'Skip()'


@dataclasses.dataclass(frozen=True)
class Pool:
  """KxK max or average pooling with padding K//2 (average excludes the padding)."""
  kind: str
  k: int = 3
  family: ClassVar[str] = 'pool'
  morphable: ClassVar[bool] = False

  def __post_init__(self):
    if self.kind not in ('max', 'avg'):
      raise UserError(f'pool kind {self.kind!r} is unknown: use max or avg')
    _check_odd('pool', 'k', self.k)

  def __str__(self):
    return f'pool({self.kind},{self.k})'

  @property
  def label(self):
    return f'Pool({self.kind}, {self.k}x{self.k})'


@dataclasses.dataclass(frozen=True)
class Conv:
  """``len(mul)+1`` separable units sharing kernel ``k`` and dilation ``d``."""
  k: int = 3
  d: int = 1
  mul: tuple[int, ...] = ()
  family: ClassVar[str] = 'conv'
  morphable: ClassVar[bool] = True

  def __post_init__(self):
    object.__setattr__(self, 'mul', tuple(self.mul))
    _check_odd('conv', 'k', self.k)
    if not (isinstance(self.d, int) and self.d >= 1):
      raise UserError(f'conv dilation d={self.d!r} is invalid: use an integer >= 1')
    if not all(isinstance(m, int) and m >= 1 for m in self.mul):
      raise UserError(f'conv mul={list(self.mul)!r} is invalid: use integers >= 1')

  def __str__(self):
    return f'conv(k={self.k},d={self.d},mul=[{",".join(map(str, self.mul))}])'

  @property
  def label(self):
    parts = [f'{self.k}x{self.k}']
    if self.d != 1:
      parts.append(f'dil={self.d}')
    if self.mul:
      parts.append(f'mult=[{", ".join(map(str, self.mul))}]')
    return f'Conv({", ".join(parts)})'


@dataclasses.dataclass(frozen=True)
class FacConv:
  """ReLU -> 1xK conv -> Kx1 conv -> BatchNorm: AmoebaNet's ``conv_7x1_1x7`` (not searched)."""
  k: int = 7
  family: ClassVar[str] = 'fac_conv'
  morphable: ClassVar[bool] = False

  def __post_init__(self):
    _check_odd('fac_conv', 'k', self.k)

  def __str__(self):
    return f'fac_conv({self.k})'

  @property
  def label(self):
    return f'Conv(1x{self.k}, {self.k}x1)'


Spec = Union[Zero, Skip, Pool, Conv, FacConv]


def _check_odd(family, key, value):
  if not (isinstance(value, int) and value >= 1 and value % 2 == 1):
    raise UserError(f'{family} kernel {key}={value!r} is invalid: use an odd integer >= 1')


def darts_name(spec: Spec) -> str | None:
  """The DARTS name of ``spec``, or None where DARTS has none."""
  if isinstance(spec, Zero):
    return 'none'
  if isinstance(spec, Skip):
    return 'skip_connect'
  if isinstance(spec, Pool):
    return f'{spec.kind}_pool_{spec.k}x{spec.k}'
  if isinstance(spec, FacConv):
    return f'conv_{spec.k}x1_1x{spec.k}'
  if spec.mul == (1,) and spec.d == 1:
    return f'sep_conv_{spec.k}x{spec.k}'
  if spec.mul == () and spec.d == 2:
    return f'dil_conv_{spec.k}x{spec.k}'
  return None


_CANONICAL = {
    'conv': re.compile(r'conv\(k=(\d+),d=(\d+),mul=\[((?:\d+(?:,\d+)*)?)\]\)'),
    'pool': re.compile(r'pool\((max|avg),(\d+)\)'),
    'fac_conv': re.compile(r'fac_conv\((\d+)\)'),
}
_DARTS = {
    'sep_conv': re.compile(r'sep_conv_(\d+)x\1'),
    'dil_conv': re.compile(r'dil_conv_(\d+)x\1'),
    'pool': re.compile(r'(max|avg)_pool_(\d+)x\2'),
    'fac_conv': re.compile(r'conv_(\d+)x1_1x\1'),
}


def parse(text: str) -> Spec:
  """Parses a canonical string (``str(spec)``) or a DARTS name into a spec."""
  if not isinstance(text, str):
    raise UserError(f'candidate {text!r} is not a string: use one of {", ".join(ALLOWED_NAMES)}')
  s = re.sub(r'\s+', '', text)
  if s in ('none', 'zero'):
    return Zero()
  if s in ('skip', 'skip_connect'):
    return Skip()
  if m := _CANONICAL['conv'].fullmatch(s):
    mul = tuple(int(v) for v in m.group(3).split(',')) if m.group(3) else ()
    return Conv(int(m.group(1)), int(m.group(2)), mul)
  if m := _CANONICAL['pool'].fullmatch(s):
    return Pool(m.group(1), int(m.group(2)))
  if m := _DARTS['sep_conv'].fullmatch(s):
    return Conv(int(m.group(1)), 1, (1,))
  if m := _DARTS['dil_conv'].fullmatch(s):
    return Conv(int(m.group(1)), 2, ())
  if m := _DARTS['pool'].fullmatch(s):
    return Pool(m.group(1), int(m.group(2)))
  if m := _CANONICAL['fac_conv'].fullmatch(s) or _DARTS['fac_conv'].fullmatch(s):
    return FacConv(int(m.group(1)))
  raise UserError(f'unknown candidate {text!r}: use one of {", ".join(ALLOWED_NAMES)}')


START_SETS: dict[str, tuple[Spec, ...]] = {
    'prdarts4': (Pool('max', 3), Pool('avg', 3), Skip(), Conv(3, 1, ())),
    'prdarts5': (Zero(), Pool('max', 3), Pool('avg', 3), Skip(), Conv(3, 1, ())),
    'darts': (Zero(), Pool('max', 3), Pool('avg', 3), Skip(), Conv(3, 1, (1,)), Conv(5, 1, (1,)),
              Conv(3, 2, ()), Conv(5, 2, ())),
}


def start_set(name: str) -> tuple[Spec, ...]:
  if name not in START_SETS:
    raise UserError(f'unknown start set {name!r}: use one of {", ".join(START_SETS)}')
  return START_SETS[name]


def unit_widths(spec: Conv, channels: int) -> list[int]:
  """Channel widths along a conv candidate: ``[C, C*m_1, ..., C*m_n, C]``."""
  return [channels] + [channels * m for m in spec.mul] + [channels]


# ---------------------------------------------------------------------------------------------
# Flax modules. Every candidate maps (N, H, W, C) -> (N, H/stride, W/stride, C).

DW_FORMS = ('grouped', 'dense', 'shift', 'shift_fused')


def check_dw_form(form: str, key: str) -> None:
  """A one-line UserError unless ``form`` (config key ``key``) is a depthwise form or ''."""
  if form and form not in DW_FORMS:
    raise UserError(f"{key} = {form!r} is unknown: use one of {', '.join(DW_FORMS)}, or '' for "
                    "the backend's default")


def default_dw_form(search: bool = False) -> str:
  """The depthwise form of a network (a supernet with ``search``) that names none, as measured
  per backend (docs/design.md, "Depthwise convolution and pooling"): shifted slices on a CPU,
  whose grouped convolution is slow (the 8-cell ``mid`` search step 8.0 s against 8.8 s
  dense-diagonal); on a GPU shifted slices in the search (the H200's 8-cell ``mid`` step
  0.48 s against 0.85 s dense-diagonal and 0.88 s grouped) and grouped convolutions in
  training; grouped on other backends."""
  backend = jax.default_backend()
  return 'shift' if backend == 'cpu' or (search and backend == 'gpu') else 'grouped'


_KERNEL_GRADS = contextvars.ContextVar('kernel_grads', default=None)


@contextlib.contextmanager
def kernel_grads(flag):
  """Within it, the ``shift`` depthwise and the pointwise convolutions traced compute their
  kernels' gradients only where the traced boolean ``flag`` is true when the program runs (else
  zeros); None computes them always. On a CPU one compiled pullback then serves the weight
  update and, without the kernel gradients' half of its time, the alpha update
  (docs/design.md, "Program layouts"). A conditional costs nothing there; on a GPU it would
  copy its predicate to the host."""
  token = _KERNEL_GRADS.set(flag)
  try:
    yield
  finally:
    _KERNEL_GRADS.reset(token)


def depthwise_conv(x, kernel, *, stride=1, dilation=1, form=None):
  """Depthwise KxK convolution with symmetric padding ``(K-1)*d//2``.

  ``kernel`` is (K, K, 1, C). All forms compute the same function: ``'grouped'`` uses
  ``feature_group_count=C``; ``'dense'`` convolves with the dense diagonal kernel
  ``kernel * eye(C)``; ``'shift'`` sums K*K strided slices of the padded input times their tap
  (``shift_depthwise``), and ``'shift_fused'`` too, with nothing that keeps XLA from fusing
  its slices (meant for GPUs, not yet measured there).
  """
  form = form or default_dw_form()
  k, c = kernel.shape[0], kernel.shape[-1]
  p = (k - 1) * dilation // 2
  if form in ('shift', 'shift_fused'):
    return shift_depthwise(x, kernel, _KERNEL_GRADS.get(), stride, dilation,
                           form == 'shift_fused')
  if form == 'grouped':
    rhs, groups = kernel, c
  elif form == 'dense':
    rhs, groups = kernel * jnp.eye(c, dtype=kernel.dtype), 1
  else:
    raise UserError(f'unknown depthwise form {form!r}: use one of {", ".join(DW_FORMS)}')
  return jax.lax.conv_general_dilated(
      x, rhs, window_strides=(stride, stride), padding=((p, p), (p, p)),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _taps(xp, k, dilation, stride, size, offset=lambda i: i):
  """The K*K slices ``xp[:, o(i)*d::s, o(j)*d::s, :]`` of ``size`` (H, W) with their (i, j)."""
  n, _, _, c = xp.shape
  for i in range(k):
    for j in range(k):
      y0, x0 = offset(i) * dilation, offset(j) * dilation
      yield (i, j), jax.lax.slice(
          xp, (0, y0, x0, 0), (n, y0 + (size[0] - 1) * stride + 1, x0 + (size[1] - 1) * stride + 1,
                               c), (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def shift_depthwise(x, kernel, kernel_grad, stride, dilation, fused):
  """Depthwise convolution as K*K shifted slices times their tap, elementwise work only; the
  kernel's gradient is zero where ``kernel_grad`` is false (``kernel_grads``).

  Its hand-written backward pass is made of the same slices (the input gradient is the
  flipped-kernel convolution of the zero-interleaved output gradient, the kernel gradient one
  reduction per tap) instead of the K*K padded copies that autodiff of slices would add up.
  Unless ``fused``, optimisation barriers around the padded inputs and the results keep XLA
  from fusing the producers into every tap and the taps into every consumer (each would then be
  recomputed), and the kernel gradient's taps run one after another in a loop, as XLA:CPU runs
  them fastest; ``fused`` leaves all of it to XLA to fuse (on a GPU each step of a loop is
  kernel launches of its own).
  """
  return _shift_forward(x, kernel, kernel_grad, stride, dilation, fused)[0]


def _hold(x, fused=False):
  """``x`` behind an optimisation barrier, unless ``fused``."""
  return x if fused else jax.lax.optimization_barrier(x)


def _shift_forward(x, kernel, kernel_grad, stride, dilation, fused):
  k = kernel.shape[0]
  p = (k - 1) * dilation // 2
  xp = _hold(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), fused)
  size = tuple((n + 2 * p - dilation * (k - 1) - 1) // stride + 1 for n in x.shape[1:3])
  out = sum(tap * kernel[i, j, 0] for (i, j), tap in _taps(xp, k, dilation, stride, size))
  return _hold(out, fused), (xp, kernel, kernel_grad)


def _interleave(g, stride, span, size, fill=0.0, fused=False):
  """``g`` (an output-sized array) with ``stride - 1`` rows and columns of ``fill`` between its
  own, and ``span`` before them, so that the backward passes read it, for an input of ``size``
  (H, W), with the forward's taps: ``gd[y + p - i*d]`` is a slice starting at ``(K-1-i)*d + p``."""
  pads = [(span, size[a] + span - (g.shape[a + 1] - 1) * stride - 1, stride - 1) for a in (0, 1)]
  return _hold(jax.lax.pad(g, jnp.asarray(fill, g.dtype), [(0, 0, 0), *pads, (0, 0, 0)]), fused)


def _shift_backward(stride, dilation, fused, residuals, g):
  xp, kernel, kernel_grad = residuals
  k = kernel.shape[0]
  p = (k - 1) * dilation // 2
  size = (xp.shape[1] - 2 * p, xp.shape[2] - 2 * p)
  dx = _taps_transposed(g, k, dilation, stride, size, lambda i, j: kernel[i, j, 0], fused)
  dk = _gated(kernel_grad, lambda: _kernel_grad(xp, g, k, dilation, stride, fused).reshape(
      kernel.shape), kernel)
  return dx, dk, None


def _gated(flag, grad, like):
  """``grad()``, or zeros like ``like`` where the traced ``flag`` is false (None: always)."""
  return grad() if flag is None else jax.lax.cond(flag, grad, lambda: jnp.zeros_like(like))


def _taps_transposed(g, k, dilation, stride, size, weight, fused=False):
  """The input gradient of ``sum_ij weight(i, j) * tap_ij`` for an input of ``size`` (H, W):
  ``dx[y] = sum_i gd[y + p - i*d] * weight(i)``, where ``gd`` is ``g`` with ``stride - 1`` zeros
  between its rows and columns."""
  span = (k - 1) * dilation
  gp = _interleave(g, stride, span, size, fused=fused)
  dx = sum(tap * weight(i, j) for (i, j), tap in _taps(
      gp, k, dilation, 1, size, offset=lambda i: k - 1 - i + span // 2 // dilation))
  return _hold(dx, fused)


def _kernel_grad(xp, g, k, dilation, stride, fused):
  """The K*K tap reductions ``sum(tap * g)``: one after another in a loop (XLA:CPU runs them
  unrolled side by side 5x slower at K=5: 18 vs 3.5 ms, batch 32, C=16), or if ``fused``
  unrolled."""
  n, h, w, c = g.shape
  if fused:
    return jnp.stack([jnp.sum(tap * g, axis=(0, 1, 2))
                      for _, tap in _taps(xp, k, dilation, stride, (h, w))])
  span = (n, (h - 1) * stride + 1, (w - 1) * stride + 1, c)

  def tap_grad(ij):
    tap = jax.lax.dynamic_slice(xp, (0, ij[0] * dilation, ij[1] * dilation, 0), span)
    return jnp.sum(tap[:, ::stride, ::stride] * g, axis=(0, 1, 2))

  ij = jnp.stack(jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing='ij'), -1).reshape(-1, 2)
  return jax.lax.map(tap_grad, ij)


shift_depthwise.defvjp(_shift_forward, _shift_backward)


def batch_norm(affine: bool, name: str = 'bn') -> nn.BatchNorm:
  """BatchNorm with PyTorch's momentum 0.1 and eps 1e-5; affine-free during search."""
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_scale=affine, use_bias=affine, name=name)


class Depthwise(nn.Module):
  k: int
  dilation: int = 1
  stride: int = 1
  form: str | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (self.k, self.k, 1, x.shape[-1]))
    return depthwise_conv(x, kernel, stride=self.stride, dilation=self.dilation, form=self.form)


class Pointwise(nn.Module):
  """1x1 convolution without bias (kernel (1, 1, in, out), initialised as ``nn.Conv``'s) as one
  matrix product over every pixel: XLA:CPU computed the convolution's gradients 1.3-3.3x slower
  (docs/design.md, "Pointwise convolution").

  ``groups``: the channels are that many side-by-side groups, each mapped to ``features``
  outputs by its own kernel (kernel (1, 1, in / groups, groups * features): the groups' kernels
  side by side), as one batched product."""
  features: int
  stride: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    g = self.groups
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1] // g, g * self.features))
    x = x[:, ::self.stride, ::self.stride]
    n, h, w, c = x.shape
    flag = _KERNEL_GRADS.get()

    def product(x, kernel):
      return x @ kernel if flag is None else _gated_matmul(x, kernel, flag)
    if g == 1:
      return product(x.reshape(n * h * w, c), kernel.reshape(c, self.features)).reshape(
          n, h, w, self.features)
    y = jax.vmap(product, in_axes=1, out_axes=1)(x.reshape(n * h * w, g, c // g),
                                                  kernel.reshape(c // g, g, self.features))
    return y.reshape(n, h, w, g * self.features)


@jax.custom_vjp
def _gated_matmul(x, w, w_grad):
  """``x @ w``; ``w``'s gradient is zero where ``w_grad`` is false (``kernel_grads``)."""
  return x @ w


def _matmul_backward(residuals, g):
  x, w, w_grad = residuals
  return g @ w.T, _gated(w_grad, lambda: x.T @ g, w), None


_gated_matmul.defvjp(lambda x, w, w_grad: (x @ w, (x, w, w_grad)), _matmul_backward)


def pointwise(features: int, stride: int = 1, name: str = 'pw', groups: int = 1) -> Pointwise:
  return Pointwise(features, stride, groups, name=name)


class ReLUConvBN(nn.Module):
  """ReLU -> 1x1 conv -> BatchNorm: the cells' input preprocessing."""
  features: int
  affine: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = pointwise(self.features, name='conv')(nn.relu(x))
    return batch_norm(self.affine)(x, use_running_average=not train)


class SepUnit(nn.Module):
  """ReLU -> depthwise KxK -> pointwise 1x1 -> BatchNorm (``groups``: ``Pointwise``'s)."""
  features: int
  k: int
  dilation: int = 1
  stride: int = 1
  affine: bool = False
  dw_form: str | None = None
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(x)
    x = Depthwise(self.k, self.dilation, self.stride, self.dw_form, name='dw')(x)
    x = pointwise(self.features, groups=self.groups)(x)
    return batch_norm(self.affine)(x, use_running_average=not train)


class ConvOp(nn.Module):
  """A conv candidate: units ``unit0..unitN``; the first carries the stride. ``groups``: that
  many candidates side by side (``Pointwise``), ``channels`` each."""
  spec: Conv
  channels: int
  stride: int = 1
  affine: bool = False
  dw_form: str | None = None
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    widths = unit_widths(self.spec, self.channels)
    for i, width in enumerate(widths[1:]):
      x = SepUnit(width, self.spec.k, self.spec.d, self.stride if i == 0 else 1, self.affine,
                  self.dw_form, self.groups, name=f'unit{i}')(x, train)
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x, k: int, stride: int):
  """KxK max pooling, padding K//2 with -inf, as the maximum of K*K shifted slices.

  The hand-written backward pass (autodiff of ``reduce_window`` uses ``select_and_scatter``,
  slow on XLA:CPU) sends each output's gradient to one input: the first of its window, in
  row-major order, that holds the maximum, as ``select_and_scatter`` and PyTorch do. Ties are
  common (pixels that a ReLU zeroed in every channel give equal values after a convolution),
  and equal values may differ in their last bit between two compiled programs, so a rule that
  fed every tied input would change the gradient's sum with the program.
  """
  return _max_pool_forward(x, k, stride)[0]


def _max_pool_forward(x, k, stride):
  p = k // 2
  xp = jax.lax.optimization_barrier(
      jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf))
  size = tuple((n - 1) // stride + 1 for n in x.shape[1:3])
  taps = list(_taps(xp, k, 1, stride, size))
  out = functools.reduce(jnp.maximum, (tap for _, tap in taps))
  first = jnp.full(out.shape, k * k, jnp.int8)  # the window's first tap holding the maximum
  for (i, j), tap in reversed(taps):
    first = jnp.where(tap == out, jnp.int8(i * k + j), first)
  out, first = jax.lax.optimization_barrier((out, first))
  return out, (x, first)


def _max_pool_backward(k, stride, residuals, g):
  x, first = residuals
  gp, fp = (_interleave(a, stride, k - 1, x.shape[1:3], fill) for a, fill in ((g, 0), (first, -1)))
  offset = lambda i: k - 1 - i + k // 2
  dx = sum(jnp.where(f == i * k + j, t, 0) for ((i, j), t), (_, f) in zip(
      _taps(gp, k, 1, 1, x.shape[1:3], offset), _taps(fp, k, 1, 1, x.shape[1:3], offset)))
  return (jax.lax.optimization_barrier(dx.astype(x.dtype)),)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def avg_pool(x, k: int, stride: int):
  """KxK average pooling, padding K//2 not counted, as the sum of K*K shifted slices over each
  window's count of real inputs; its backward pass is the same slices of the output gradient
  (autodiff of ``reduce_window`` with counts is slow on XLA:CPU: 2.8 vs 0.6 ms, 3x3 stride 1,
  batch 32, 32x32x16)."""
  return _avg_pool_forward(x, k, stride)[0]


def _window_counts(n, k, stride):
  """How many of the ``k`` inputs of each output's window along an axis of ``n`` are real."""
  starts = np.arange(0, n, stride) - k // 2
  return np.minimum(starts + k, n) - np.maximum(starts, 0)


def _avg_pool_scale(shape, k, stride):
  cy, cx = (_window_counts(n, k, stride) for n in shape[1:3])
  return jnp.asarray(1.0 / np.outer(cy, cx)[None, :, :, None], jnp.float32)


def _avg_pool_forward(x, k, stride):
  p = k // 2
  xp = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))
  size = tuple((n - 1) // stride + 1 for n in x.shape[1:3])
  out = sum(tap for _, tap in _taps(xp, k, 1, stride, size)) * _avg_pool_scale(x.shape, k, stride)
  return jax.lax.optimization_barrier(out.astype(x.dtype)), x.shape


def _avg_pool_backward(k, stride, shape, g):
  g = (g * _avg_pool_scale(shape, k, stride)).astype(g.dtype)
  return (_taps_transposed(g, k, 1, stride, shape[1:3], lambda i, j: 1),)


avg_pool.defvjp(_avg_pool_forward, _avg_pool_backward)


class PoolOp(nn.Module):
  spec: Pool
  stride: int = 1

  def __call__(self, x, train: bool):
    del train
    return (max_pool if self.spec.kind == 'max' else avg_pool)(x, self.spec.k, self.stride)


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (one on x shifted by a pixel), concat, BatchNorm.
  ``groups``: that many side by side (``Pointwise``), each of ``features`` outputs."""
  features: int
  affine: bool = False
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    if self.features % 2:
      raise ValueError(f'FactorizedReduce needs an even channel count, got {self.features}')
    x = nn.relu(x)
    g, half = self.groups, self.features // 2
    a = pointwise(half, 2, 'conv1', g)(x)
    b = pointwise(half, 2, 'conv2', g)(x[:, 1:, 1:, :])
    x = jnp.concatenate([a.reshape(*a.shape[:3], g, half), b.reshape(*b.shape[:3], g, half)],
                        axis=-1).reshape(*a.shape[:3], g * self.features)
    return batch_norm(self.affine)(x, use_running_average=not train)


class ZeroOp(nn.Module):
  stride: int = 1

  def __call__(self, x, train: bool):
    del train
    return jnp.zeros_like(x[:, ::self.stride, ::self.stride, :])


class IdentityOp(nn.Module):

  def __call__(self, x, train: bool):
    del train
    return x


class FacConvOp(nn.Module):
  """ReLU -> 1xK conv (stride (1, s)) -> Kx1 conv (stride (s, 1)) -> BatchNorm, both C -> C."""
  spec: FacConv
  channels: int
  stride: int = 1
  affine: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    k, p, s = self.spec.k, self.spec.k // 2, self.stride
    x = nn.relu(x)
    x = nn.Conv(self.channels, (1, k), strides=(1, s), padding=((0, 0), (p, p)), use_bias=False,
                name='conv1')(x)
    x = nn.Conv(self.channels, (k, 1), strides=(s, 1), padding=((p, p), (0, 0)), use_bias=False,
                name='conv2')(x)
    return batch_norm(self.affine)(x, use_running_average=not train)


def make_op(spec: Spec, channels: int, stride: int = 1, affine: bool = False,
            dw_form: str | None = None, groups: int = 1, **module) -> nn.Module:
  """The Flax module of candidate ``spec`` on ``channels`` channels (``module``: its name or
  parent); call it as ``op(x, train)``. ``groups``: that many copies side by side on
  ``groups * channels`` channels, each with its own weights (their variables are the copies'
  side by side on the last axis); not for ``FacConv``."""
  if isinstance(spec, Zero):
    return ZeroOp(stride, **module)
  if isinstance(spec, Skip):
    return IdentityOp(**module) if stride == 1 else FactorizedReduce(channels, affine, groups,
                                                                     **module)
  if isinstance(spec, Pool):
    return PoolOp(spec, stride, **module)
  if isinstance(spec, Conv):
    return ConvOp(spec, channels, stride, affine, dw_form, groups, **module)
  if isinstance(spec, FacConv):
    if groups != 1:
      raise ValueError(f'{spec} has no side-by-side form')
    return FacConvOp(spec, channels, stride, affine, **module)
  raise TypeError(f'not a candidate spec: {spec!r}')
