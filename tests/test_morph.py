"""Morph moves, presets, reachable spaces and parameter transfer (reference §3.2, §4)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prnas_jax import morph, ops
from prnas_jax.errors import UserError
from prnas_jax.ops import Conv, Pool, Skip, Zero

PRDARTS4 = ops.START_SETS['prdarts4']


def test_reachable_darts_like_is_15():
  space = morph.reachable(PRDARTS4, 'darts_like')
  assert len(space) == 15
  convs = {s for s in space if isinstance(s, Conv)}
  assert convs == {Conv(k, d, m) for k in (3, 5, 7) for d in (1, 2) for m in ((), (1,))}


def test_reachable_r_depth_is_45():
  space = morph.reachable(PRDARTS4, 'r_depth')
  assert len(space) == 45
  kd = {(s.k, s.d) for s in space if isinstance(s, Conv)}
  assert kd == {(1, 1), (3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)}
  assert {s.mul for s in space if isinstance(s, Conv)} == {(), (1,), (2,), (3,), (4,), (5,)}


def test_reachable_unrestricted_keeps_growing():
  small = morph.reachable(PRDARTS4, 'unrestricted', limit=100)
  large = morph.reachable(PRDARTS4, 'unrestricted', limit=1000)
  assert len(small) == 100 and len(large) == 1000 and small < large
  assert Conv(3, 1, (2, 1, 1)) in large  # stacked and widened
  assert all(list(s.mul) == sorted(s.mul, reverse=True) for s in large if isinstance(s, Conv))
  with pytest.raises(UserError, match='pass limit'):
    morph.reachable(PRDARTS4, 'unrestricted')


def test_unknown_preset():
  with pytest.raises(UserError, match="unknown morph preset 'darts': use one of darts_like"):
    morph.get_preset('darts')


@pytest.mark.parametrize('spec,preset,children', [
    (Conv(3), 'darts_like', {Conv(5), Conv(3, 2), Conv(3, 1, (1,))}),
    (Conv(7, 2, (1,)), 'darts_like', {Conv(5, 2, (1,)), Conv(7, 1, (1,))}),
    (Conv(3, 2), 'r_depth', {Conv(5, 2), Conv(3, 1), Conv(3, 2, (1,))}),  # no k=1 while d=2
    (Conv(1, 1, (1,)), 'r_depth', {Conv(3, 1, (1,)), Conv(1, 1, (2,))}),  # k=1: no dilation
    (Conv(3, 1, (5,)), 'r_depth', {Conv(1, 1, (5,)), Conv(5, 1, (5,)), Conv(3, 2, (5,))}),
    (Conv(3, 1, (2, 1)), 'unrestricted', {Conv(1, 1, (2, 1)), Conv(5, 1, (2, 1)),
                                         Conv(3, 2, (2, 1)), Conv(3, 1, (2, 1, 1)),
                                         Conv(3, 1, (2, 2))}),  # widen the first narrowest
])
def test_allowed_moves(spec, preset, children):
  assert set(morph.allowed_moves(spec, morph.get_preset(preset)).values()) == children


def test_propose_is_uniform_over_allowed_moves():
  rng = np.random.default_rng(0)
  preset = morph.get_preset('darts_like')
  counts = collections.Counter(morph.propose(Conv(3), preset, rng) for _ in range(3000))
  assert set(counts) == {Conv(5), Conv(3, 2), Conv(3, 1, (1,))}
  assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in counts.values())


@pytest.mark.parametrize('spec', [Zero(), Skip(), Pool('max', 3), Pool('avg', 3)])
def test_non_morphable_families_say_so(spec):
  with pytest.raises(morph.NotMorphable, match='has no morph'):
    morph.propose(spec, morph.get_preset('unrestricted'), np.random.default_rng(0))


def test_propose_stays_in_the_reachable_space():
  rng = np.random.default_rng(1)
  for name in ('darts_like', 'r_depth'):
    preset = morph.get_preset(name)
    space = morph.reachable(PRDARTS4, preset)
    for spec in (s for s in space if s.morphable):
      for _ in range(10):
        assert morph.propose(spec, preset, rng) in space


def test_move_between():
  assert morph.move_between(Conv(3), Conv(5)) == 'grow_kernel'
  assert morph.move_between(Conv(3, 1, (1, 1)), Conv(3, 1, (2, 1))) == 'widen'
  with pytest.raises(ValueError, match='not one morph away'):
    morph.move_between(Conv(3), Conv(7))


# ------------------------------------------------------------------------------ transfer

C = 4
X = jax.random.normal(jax.random.key(0), (4, 8, 8, C))


def _parent_vars(spec, stride, affine):
  """Initialised variables with non-trivial BN statistics (and affine parameters)."""
  op = ops.make_op(spec, C, stride, affine)
  variables = op.init(jax.random.key(1), X, train=False)
  leaves, tree = jax.tree.flatten(variables['batch_stats'])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  stats = jax.tree.unflatten(tree, [0.5 + jax.random.uniform(k, leaf.shape) for k, leaf in
                                    zip(keys, leaves)])  # positive: valid for means and vars
  variables = {**variables, 'batch_stats': stats}
  if affine:
    variables['params'] = jax.tree.map(lambda p: p + 0.3 * jnp.cos(jnp.arange(p.size).reshape(
        p.shape)), variables['params'])
  return variables


def _outputs(spec, stride, affine, variables):
  op = ops.make_op(spec, C, stride, affine)
  train, new = op.apply(variables, X, train=True, mutable=['batch_stats'])
  return train, op.apply(variables, X, train=False), new['batch_stats']


def _morph(parent, child, stride, affine, prepare=lambda v: v):
  pvars = prepare(_parent_vars(parent, stride, affine))
  cvars = morph.transfer(pvars, parent, child, C, jax.random.key(3))
  # the child variables have exactly the structure of a freshly built child
  fresh = ops.make_op(child, C, stride, affine).init(jax.random.key(4), X, train=False)
  assert jax.tree.map(jnp.shape, cvars) == jax.tree.map(jnp.shape, fresh)
  return _outputs(parent, stride, affine, pvars), _outputs(child, stride, affine, cvars)


EXACT = [(Conv(3), Conv(5)), (Conv(5, 2), Conv(7, 2)), (Conv(1, 1, (2,)), Conv(3, 1, (2,))),
         (Conv(3, 1, (1,)), Conv(3, 1, (2,))), (Conv(3, 2, (2, 1)), Conv(3, 2, (2, 2))),
         (Conv(5, 1, (1, 1)), Conv(5, 1, (2, 1)))]


@pytest.mark.parametrize('affine', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('parent,child', EXACT, ids=lambda s: str(s))
def test_kernel_growth_and_widening_are_exact(parent, child, stride, affine):
  (p_train, p_eval, _), (c_train, c_eval, _) = _morph(parent, child, stride, affine)
  np.testing.assert_allclose(c_train, p_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c_eval, p_eval, rtol=1e-5, atol=1e-5)


def test_widening_adds_trainable_capacity():
  parent, child = Conv(3, 1, (1,)), Conv(3, 1, (2,))
  cvars = morph.transfer(_parent_vars(parent, 1, False), parent, child, C, jax.random.key(3))
  op = ops.make_op(child, C)

  def loss(params):
    y, _ = op.apply({**cvars, 'params': params}, X, train=True, mutable=['batch_stats'])
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size)

  grads = jax.grad(loss)(cvars['params'])
  new_rows = grads['unit1']['pw']['kernel'][:, :, C:, :]  # the zero-initialised rows
  assert np.any(np.abs(new_rows) > 1e-6)
  assert not np.any(cvars['params']['unit1']['pw']['kernel'][:, :, C:, :])


def _zero_outer_ring(variables):
  def ring(w):
    return jnp.zeros_like(w).at[1:-1, 1:-1].set(w[1:-1, 1:-1])
  params = {u: {**p, 'dw': {'kernel': ring(p['dw']['kernel'])}}
            for u, p in variables['params'].items()}
  return {**variables, 'params': params}


@pytest.mark.parametrize('affine', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('parent,child', [(Conv(5), Conv(3)), (Conv(7, 2, (1,)), Conv(5, 2, (1,))),
                                          (Conv(3, 1, (2,)), Conv(1, 1, (2,)))], ids=str)
def test_kernel_shrink_is_exact_when_outer_ring_is_zero(parent, child, stride, affine):
  (p_train, p_eval, _), (c_train, c_eval, _) = _morph(parent, child, stride, affine,
                                                      _zero_outer_ring)
  np.testing.assert_allclose(c_train, p_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c_eval, p_eval, rtol=1e-5, atol=1e-5)
  (p_train, _, _), (c_train, _, _) = _morph(parent, child, stride, affine)
  assert np.max(np.abs(c_train - p_train)) > 1e-3  # with a live ring it is only approximate


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('parent,child', [(Conv(3), Conv(3, 2)), (Conv(5, 2, (1,)), Conv(5, 1, (1,)))],
                         ids=str)
def test_dilation_change_keeps_weights_and_changes_the_function(parent, child, stride):
  pvars = _parent_vars(parent, stride, False)
  cvars = morph.transfer(pvars, parent, child, C, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, cvars, pvars)
  (p_train, _, _), (c_train, _, _) = _morph(parent, child, stride, False)
  assert np.max(np.abs(c_train - p_train)) > 1e-2


@pytest.mark.parametrize('affine', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
def test_unit_insertion_computes_bn_of_relu(stride, affine):
  """The appended unit is identity except its ReLU and its reset BN: child = BN(ReLU(parent))."""
  parent, child = Conv(3, 2), Conv(3, 2, (1,))
  (p_train, p_eval, _), (c_train, c_eval, _) = _morph(parent, child, stride, affine)
  r = jax.nn.relu(p_train)
  expected_train = (r - r.mean((0, 1, 2))) / jnp.sqrt(r.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(c_train, expected_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(c_eval, jax.nn.relu(p_eval) / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(c_eval - p_eval)) > 0.1  # not function-preserving


def test_train_mode_batch_statistics_carry_over_exactly():
  parent, child = Conv(3, 1, (1,)), Conv(3, 1, (2,))
  (_, _, p_stats), (_, _, c_stats) = _morph(parent, child, 1, False)
  np.testing.assert_allclose(c_stats['unit1']['bn']['mean'], p_stats['unit1']['bn']['mean'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c_stats['unit0']['bn']['mean'][:C], p_stats['unit0']['bn']['mean'],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('parent,child', EXACT[:1] + [(Conv(3, 1, (1,)), Conv(3, 1, (1, 1)))] +
                         EXACT[3:4], ids=str)
def test_transfers_run_under_jit(parent, child):
  pvars = _parent_vars(parent, 1, False)
  eager = morph.transfer(pvars, parent, child, C, jax.random.key(3))
  jitted = jax.jit(morph.transfer, static_argnums=(1, 2, 3))(pvars, parent, child, C,
                                                             jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jitted, eager)


def test_every_move_has_a_transfer():
  assert set(morph.TRANSFERS) == set(morph.MOVES)
