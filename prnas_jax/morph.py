"""Network morphisms of conv candidates: moves, restriction presets, reachable spaces, and the
parameter transfer that initialises a child from its parent (reference §3.2, §4).

Transfers are pure functions ``(parent_vars, parent, child, channels, rng) -> child_vars`` on
Flax variable dicts (``params`` and ``batch_stats`` of a ``ConvOp``); they run under jit with the
specs and ``channels`` static. Function-preserving: kernel growth and widening (exact), kernel
shrink (exact only if the outer ring is zero). Not preserving: a dilation change (same weights
on a different grid) and unit insertion (the new unit computes BN(ReLU(x))).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax.errors import UserError
from prnas_jax.ops import Conv, Spec, unit_widths


class NotMorphable(ValueError):
  """Raised by ``propose`` for candidates without moves (pools, skip, zero)."""


@dataclasses.dataclass(frozen=True)
class Preset:
  """Bounds on conv candidates reachable by morphing (reference §3.2)."""
  name: str
  min_k: int
  max_k: int
  max_dil: int
  max_len: int  # bound on len(mul): extra stacked units
  max_sum: int  # bound on sum(mul)
  max_width: int  # bound on a single mul entry


PRESETS = {
    p.name: p for p in (
        Preset('darts_like', 3, 7, 2, 1, 1, 1),
        Preset('r_depth', 1, 7, 2, 1, 5, 5),
        Preset('unrestricted', 1, 7, 2, 999, 999, 999),
    )
}
_ANY = Preset('any', 1, 2**31, 2**31, 2**31, 2**31, 2**31)  # structural validity only


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise UserError(f'unknown morph preset {name!r}: use one of {", ".join(PRESETS)}')
  return PRESETS[name]


def _first_min(mul):
  return mul.index(min(mul))


def _grow_kernel(s: Conv, p: Preset):
  if s.k + 2 <= p.max_k:
    return dataclasses.replace(s, k=s.k + 2)


def _shrink_kernel(s: Conv, p: Preset):
  if s.k - 2 >= p.min_k and not (s.k - 2 == 1 and s.d >= 2):
    return dataclasses.replace(s, k=s.k - 2)


def _grow_dilation(s: Conv, p: Preset):
  if s.k != 1 and s.d < p.max_dil:
    return dataclasses.replace(s, d=s.d + 1)


def _shrink_dilation(s: Conv, p: Preset):
  if s.d > 1 and not (s.k == 1 and s.d == 2):
    return dataclasses.replace(s, d=s.d - 1)


def _insert_unit(s: Conv, p: Preset):
  if len(s.mul) < p.max_len and sum(s.mul) < p.max_sum:
    return dataclasses.replace(s, mul=s.mul + (1,))


def _widen(s: Conv, p: Preset):
  if s.mul and min(s.mul) < p.max_width and sum(s.mul) < p.max_sum:
    i = _first_min(s.mul)
    return dataclasses.replace(s, mul=s.mul[:i] + (s.mul[i] + 1,) + s.mul[i + 1:])


_MOVES: dict[str, Callable[[Conv, Preset], Conv | None]] = {
    'grow_kernel': _grow_kernel,
    'shrink_kernel': _shrink_kernel,
    'grow_dilation': _grow_dilation,
    'shrink_dilation': _shrink_dilation,
    'insert_unit': _insert_unit,
    'widen': _widen,
}
MOVES = tuple(_MOVES)


def allowed_moves(spec: Spec, preset: Preset) -> dict[str, Conv]:
  """The moves ``preset`` allows on ``spec``, each with its child, in ``MOVES`` order."""
  if not spec.morphable:
    return {}
  children = {name: move(spec, preset) for name, move in _MOVES.items()}
  return {name: child for name, child in children.items() if child is not None}


def propose(spec: Spec, preset: Preset, rng: np.random.Generator) -> Conv:
  """One child of ``spec`` by a move drawn uniformly among those ``preset`` allows."""
  moves = allowed_moves(spec, preset)
  if not moves:
    raise NotMorphable(f'{spec} has no morph under preset {preset.name}')
  return list(moves.values())[rng.integers(len(moves))]


def reachable(start: Iterable[Spec], preset: Preset | str, limit: int | None = None
              ) -> frozenset[Spec]:
  """All candidates reachable from ``start`` by morphs under ``preset`` (start included).

  Breadth-first; stops at ``limit`` candidates. Without a limit, a space that grows past 100000
  candidates (``unrestricted``) is an error.
  """
  preset = get_preset(preset) if isinstance(preset, str) else preset
  seen = list(dict.fromkeys(start))
  found, queue = set(seen), collections.deque(seen)
  cap = limit if limit is not None else 100_000
  while queue and len(found) < cap:
    for child in allowed_moves(queue.popleft(), preset).values():
      if child not in found and len(found) < cap:
        found.add(child)
        queue.append(child)
  if limit is None and queue:
    raise UserError(f'the space reachable under preset {preset.name} exceeds {cap} candidates: '
                    'pass limit=N')
  return frozenset(found)


def move_between(parent: Spec, child: Spec) -> str:
  """The name of the single move that turns ``parent`` into ``child``."""
  for name, child_of in allowed_moves(parent, _ANY).items():
    if child_of == child:
      return name
  raise ValueError(f'{child} is not one morph away from {parent}')


# ---------------------------------------------------------------------------------------------
# Parameter transfer. Variables of a ConvOp: params/unit{i}/{dw,pw}/kernel, params/unit{i}/bn/
# {scale,bias} (affine only), batch_stats/unit{i}/bn/{mean,var}.

_xavier_normal = jax.nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


def _units(variables):
  return len(variables['params'])


def _affine(variables):
  return 'bn' in variables['params']['unit0']


def _replace_unit(variables, i, params=None, stats=None):
  name = f'unit{i}'
  out = {**variables, 'params': {**variables['params']}, 'batch_stats': {**variables['batch_stats']}}
  if params is not None:
    out['params'][name] = params
  if stats is not None:
    out['batch_stats'][name] = stats
  return out


def _with_kernels(variables, fn):
  """Applies ``fn`` to the depthwise kernel of every unit."""
  out = variables
  for i in range(_units(variables)):
    unit = variables['params'][f'unit{i}']
    out = _replace_unit(out, i, params={**unit, 'dw': {'kernel': fn(unit['dw']['kernel'])}})
  return out


def grow_kernel(variables, parent: Conv, child: Conv, channels: int, rng):
  """k -> k+2: every depthwise kernel zero-padded by a ring. Exact."""
  del channels, rng
  r = (child.k - parent.k) // 2
  return _with_kernels(variables, lambda w: jnp.pad(w, ((r, r), (r, r), (0, 0), (0, 0))))


def shrink_kernel(variables, parent: Conv, child: Conv, channels: int, rng):
  """k -> k-2: every depthwise kernel loses its outer ring. Exact iff that ring is zero."""
  del channels, rng
  r = (parent.k - child.k) // 2
  return _with_kernels(variables, lambda w: w[r:w.shape[0] - r, r:w.shape[1] - r])


def change_dilation(variables, parent: Conv, child: Conv, channels: int, rng):
  """d -> d+-1: the same weights, sampled on a different grid. Not function-preserving."""
  del parent, child, channels, rng
  return variables


def insert_unit(variables, parent: Conv, child: Conv, channels: int, rng):
  """Appends a C->C unit: centre-tap depthwise, identity pointwise, reset BN.

  Not function-preserving: the new unit computes BN(ReLU(x)) of the old output.
  """
  del parent, rng
  c, k, dtype = channels, child.k, variables['params']['unit0']['dw']['kernel'].dtype
  dw = jnp.zeros((k, k, 1, c), dtype).at[k // 2, k // 2].set(1.0)
  params = {'dw': {'kernel': dw}, 'pw': {'kernel': jnp.eye(c, dtype=dtype)[None, None]}}
  if _affine(variables):
    params['bn'] = {'scale': jnp.ones((c,), dtype), 'bias': jnp.zeros((c,), dtype)}
  stats = {'bn': {'mean': jnp.zeros((c,), dtype), 'var': jnp.ones((c,), dtype)}}
  return _replace_unit(variables, len(child.mul), params, stats)


def widen(variables, parent: Conv, child: Conv, channels: int, rng):
  """Hidden width of unit i grows: new output channels of unit i (random pointwise columns,
  BN reset) and new depthwise filters of unit i+1 (random), whose pointwise rows are zero.
  Exact: the new channels reach the output only through zero weights.
  """
  i = next(j for j, (a, b) in enumerate(zip(parent.mul, child.mul)) if a != b)
  old = unit_widths(parent, channels)
  new = unit_widths(child, channels)
  extra = new[i + 1] - old[i + 1]
  rng_pw, rng_dw = jax.random.split(rng)

  unit = variables['params'][f'unit{i}']
  pw = unit['pw']['kernel']
  grown = {**unit, 'pw': {'kernel': jnp.concatenate(
      [pw, _xavier_normal(rng_pw, (1, 1, old[i], extra), pw.dtype)], axis=-1)}}
  if _affine(variables):
    grown['bn'] = {'scale': jnp.concatenate([unit['bn']['scale'], jnp.ones((extra,), pw.dtype)]),
                   'bias': jnp.concatenate([unit['bn']['bias'], jnp.zeros((extra,), pw.dtype)])}
  bn = variables['batch_stats'][f'unit{i}']['bn']
  stats = {'bn': {'mean': jnp.concatenate([bn['mean'], jnp.zeros((extra,), bn['mean'].dtype)]),
                  'var': jnp.concatenate([bn['var'], jnp.ones((extra,), bn['var'].dtype)])}}
  out = _replace_unit(variables, i, grown, stats)

  nxt = variables['params'][f'unit{i + 1}']
  dw, pw = nxt['dw']['kernel'], nxt['pw']['kernel']
  k = dw.shape[0]
  nxt = {**nxt,
         'dw': {'kernel': jnp.concatenate(
             [dw, _xavier_normal(rng_dw, (k, k, 1, extra), dw.dtype)], axis=-1)},
         'pw': {'kernel': jnp.concatenate(
             [pw, jnp.zeros((1, 1, extra, pw.shape[-1]), pw.dtype)], axis=2)}}
  return _replace_unit(out, i + 1, params=nxt)


TRANSFERS = {
    'grow_kernel': grow_kernel,
    'shrink_kernel': shrink_kernel,
    'grow_dilation': change_dilation,
    'shrink_dilation': change_dilation,
    'insert_unit': insert_unit,
    'widen': widen,
}


def transfer(variables, parent: Conv, child: Conv, channels: int, rng):
  """Child variables from the parent's, by the transfer of the move between them."""
  return TRANSFERS[move_between(parent, child)](variables, parent, child, channels, rng)
