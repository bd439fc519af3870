"""Candidate specs (names, labels, parsing) and their Flax modules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from prnas_jax import morph, ops, space, supernet
from prnas_jax.errors import UserError
from prnas_jax.ops import Conv, FacConv, Pool, Skip, Zero


def _all_specs():
  specs = set(morph.reachable(ops.START_SETS['prdarts4'], 'r_depth'))
  specs |= morph.reachable(ops.START_SETS['prdarts4'], 'unrestricted', limit=300)
  for start in ops.START_SETS.values():
    specs |= set(start)
  return sorted(specs, key=str)


def test_canonical_strings_round_trip():
  specs = _all_specs()
  assert len({str(s) for s in specs}) == len(specs)
  for spec in specs:
    assert ops.parse(str(spec)) == spec
    assert hash(ops.parse(str(spec))) == hash(spec)


def test_canonical_spelling():
  assert str(Conv(5, 2, (1, 2))) == 'conv(k=5,d=2,mul=[1,2])'
  assert str(Conv(3)) == 'conv(k=3,d=1,mul=[])'
  assert str(Pool('avg', 3)) == 'pool(avg,3)'
  assert (str(Skip()), str(Zero())) == ('skip', 'none')


def test_specs_are_immutable():
  spec = Conv(3, 1, [1])
  assert spec.mul == (1,)
  with pytest.raises(AttributeError):
    spec.k = 5


@pytest.mark.parametrize('spec,label', [
    (Conv(5, 2), 'Conv(5x5, dil=2)'), (Conv(7, 1, (1,)), 'Conv(7x7, mult=[1])'),
    (Conv(3, 2, (2, 1)), 'Conv(3x3, dil=2, mult=[2, 1])'), (Conv(3), 'Conv(3x3)'),
    (Pool('max', 3), 'Pool(max, 3x3)'), (Skip(), 'Skip()'), (Zero(), 'Zero()')])
def test_labels(spec, label):
  assert spec.label == label


@pytest.mark.parametrize('spec,name', [
    (Conv(3, 1, (1,)), 'sep_conv_3x3'), (Conv(5, 1, (1,)), 'sep_conv_5x5'),
    (Conv(5, 2), 'dil_conv_5x5'), (Conv(3, 2), 'dil_conv_3x3'), (Pool('max', 3), 'max_pool_3x3'),
    (Pool('avg', 3), 'avg_pool_3x3'), (Skip(), 'skip_connect'), (Zero(), 'none')])
def test_darts_names(spec, name):
  assert ops.darts_name(spec) == name
  assert ops.parse(name) == spec


def test_no_darts_name():
  assert ops.darts_name(Conv(3)) is None
  assert ops.darts_name(Conv(3, 1, (2,))) is None


@pytest.mark.parametrize('bad', [
    'sep_conv_3x5', 'conv(k=4,d=1,mul=[])', 'conv(k=3,d=0,mul=[])', 'conv(k=3,d=1,mul=[0])',
    'pool(min,3)', 'pool(max,2)', 'conv3x3', '', 'conv(k=3,d=1,mul=[1,])'])
def test_bad_names_are_one_clear_error(bad):
  with pytest.raises(UserError) as info:
    ops.parse(bad)
  message = str(info.value)
  assert '\n' not in message and ': use ' in message


def test_unknown_name_lists_what_is_allowed():
  with pytest.raises(UserError, match=r"unknown candidate 'sep_conv_3x5': use one of none, skip"):
    ops.parse('sep_conv_3x5')


def test_start_sets():
  assert [str(s) for s in ops.START_SETS['prdarts4']] == [
      'pool(max,3)', 'pool(avg,3)', 'skip', 'conv(k=3,d=1,mul=[])']
  assert ops.START_SETS['prdarts5'] == (Zero(),) + ops.START_SETS['prdarts4']
  assert [ops.darts_name(s) for s in ops.START_SETS['darts']] == [
      'none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'sep_conv_5x5',
      'dil_conv_3x3', 'dil_conv_5x5']
  with pytest.raises(UserError, match='unknown start set'):
    ops.start_set('prdarts6')


# ------------------------------------------------------------------------------ modules

C = 8


def _init_apply(spec, stride, affine=False, x=None, train=True, dw_form=None):
  op = ops.make_op(spec, C, stride, affine, dw_form)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, C)) if x is None else x
  variables = op.init(jax.random.key(1), x, train=False)
  y, _ = op.apply(variables, x, train=train, mutable=['batch_stats'])
  return variables, y


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('spec', [Zero(), Skip(), Pool('max', 3), Pool('avg', 5), Conv(3),
                                  Conv(5, 2, (2,)), Conv(1, 1, (1, 1)), FacConv(7)])
def test_shapes(spec, stride):
  _, y = _init_apply(spec, stride)
  assert y.shape == (2, 8 // stride, 8 // stride, C)


def test_zero_is_zero_and_skip_is_identity():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, C))
  assert not np.any(_init_apply(Zero(), 1, x=x)[1])
  np.testing.assert_array_equal(_init_apply(Skip(), 1, x=x)[1], x)


def test_avg_pool_excludes_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1) * jnp.ones((1, 1, 1, C))
  y = ops.make_op(Pool('avg', 3), C).apply({}, x, train=False)
  assert y[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # 4 valid cells, not 9
  assert y[0, 1, 1, 0] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))


def test_max_pool_pads_with_minus_infinity():
  x = -1.0 - jnp.arange(16.0).reshape(1, 4, 4, 1) * jnp.ones((1, 1, 1, C))
  y = ops.make_op(Pool('max', 3), C, stride=2).apply({}, x, train=False)
  assert y.shape == (1, 2, 2, C)
  assert y[0, 0, 0, 0] == -1.0  # the padding (0 if it were zero) never wins


def test_symmetric_padding_with_stride_two():
  """A 3x3 stride-2 kernel that picks the top-left tap reads the padding at output (0, 0)."""
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)
  for form in ops.DW_FORMS:
    y = ops.depthwise_conv(x, kernel, stride=2, form=form)
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0.0, 0.0], [0.0, 6.0]])


@pytest.mark.parametrize('k,d,stride', [(1, 1, 1), (3, 1, 1), (3, 2, 2), (5, 1, 2), (5, 2, 1),
                                        (7, 2, 1)])
def test_depthwise_forms_agree(k, d, stride):
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 9, 9, C))
  w = jax.random.normal(kw, (k, k, 1, C))

  def loss(x, w, form):
    y = ops.depthwise_conv(x, w, stride=stride, dilation=d, form=form)
    return jnp.sum(jnp.sin(y)), y

  (_, y_g), g_g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, 'grouped')
  for form in ('dense', 'shift', 'shift_fused'):
    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, form)
    np.testing.assert_allclose(y, y_g, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_g):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', ['shift', 'shift_fused'])
def test_kernel_grads_flag_zeroes_only_the_kernel_gradients_at_run_time(form):
  """One program, the flag its argument: false gives zero kernel gradients (depthwise and
  pointwise) and the same input gradient; true the gradients without the flag."""
  x = jax.random.normal(jax.random.key(5), (2, 7, 7, C))
  unit = ops.SepUnit(2 * C, 3, stride=2, dw_form=form)
  variables = unit.init(jax.random.key(6), x, train=True)

  def loss(params, x):
    y, _ = unit.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y))

  @jax.jit
  def grads(params, x, flag):
    with ops.kernel_grads(flag):
      return jax.grad(loss, argnums=(0, 1))(params, x)

  want = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
  on, off = (grads(variables['params'], x, np.bool_(flag)) for flag in (True, False))
  assert grads._cache_size() == 1
  assert set(want[0]) == {'dw', 'pw'}
  for name in want[0]:
    kernel = want[0][name]['kernel']
    assert np.abs(kernel).max() > 0.01
    np.testing.assert_allclose(on[0][name]['kernel'], kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(off[0][name]['kernel'], np.zeros_like(kernel))
  for g in (on[1], off[1]):
    np.testing.assert_allclose(g, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend, search, training', [
    ('cpu', 'shift', 'shift'), ('gpu', 'shift', 'grouped'), ('tpu', 'grouped', 'grouped')])
def test_default_form_follows_backend_and_work(monkeypatch, backend, search, training):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert (ops.default_dw_form(search=True), ops.default_dw_form()) == (search, training)
  start = space.initial_space('prdarts4')
  assert (supernet.build(start).dw_form, supernet.build(start, dw_form='dense').dw_form) == (
      search, 'dense')


def test_unknown_form_is_refused():
  with pytest.raises(UserError, match='unknown depthwise form'):
    ops.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), form='sparse')


@pytest.mark.parametrize('form', ['dense', 'shift', 'shift_fused'])
def test_conv_op_forms_agree_as_modules(form):
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, C))
  vg, yg = _init_apply(Conv(3, 2, (1,)), 2, x=x, dw_form='grouped')
  vd, yd = _init_apply(Conv(3, 2, (1,)), 2, x=x, dw_form=form)
  assert jax.tree.map(jnp.shape, vg) == jax.tree.map(jnp.shape, vd)
  np.testing.assert_allclose(yg, yd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,stride', [(8, 1), (8, 2), (9, 2)])
def test_pointwise_equals_a_one_by_one_convolution(size, stride):
  """Same kernel (shape, name, initial values), outputs and gradients as flax's 1x1 ``nn.Conv``."""
  x = jax.random.normal(jax.random.key(6), (2, size, size, C))
  conv = nn.Conv(5, (1, 1), strides=(stride, stride), padding='VALID', use_bias=False)
  variables = conv.init(jax.random.key(7), x)
  jax.tree.map(np.testing.assert_array_equal, ops.Pointwise(5, stride).init(jax.random.key(7), x),
               variables)

  def loss(variables, x, module):
    y = module.apply(variables, x)
    return jnp.sum(jnp.sin(y)), y

  (_, want), g_want = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x, conv)
  (_, got), g_got = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables, x, ops.Pointwise(5, stride))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_factorized_reduce_by_hand():
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, C))
  variables, y = _init_apply(Skip(), 2, x=x)
  p = variables['params']
  r = jax.nn.relu(x)
  a = jnp.einsum('nhwc,cd->nhwd', r[:, ::2, ::2], p['conv1']['kernel'][0, 0])
  b = jnp.einsum('nhwc,cd->nhwd', r[:, 1::2, 1::2], p['conv2']['kernel'][0, 0])
  z = jnp.concatenate([a, b], -1)
  z = (z - z.mean((0, 1, 2))) / jnp.sqrt(z.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y, z, rtol=1e-4, atol=1e-4)


def test_batch_norm_affine_only_for_retraining():
  search, _ = _init_apply(Conv(3), 1, affine=False)
  retrain, _ = _init_apply(Conv(3), 1, affine=True)
  assert set(search['params']['unit0']) == {'dw', 'pw'}
  assert set(retrain['params']['unit0']['bn']) == {'scale', 'bias'}
  assert set(search['batch_stats']['unit0']['bn']) == {'mean', 'var'}


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('affine', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('spec', [Zero(), Skip(), Pool('max', 3), Pool('avg', 3), Conv(3),
                                  Conv(5, 2, (1,)), Conv(3, 1, (2,)), Conv(7, 1, (1, 3, 2)),
                                  FacConv(7), FacConv(3)])
def test_parameter_counts_closed_form(spec, stride, affine):
  variables, _ = _init_apply(spec, stride, affine)
  bn = 2 if affine else 0
  if isinstance(spec, Conv):
    w = [C] + [C * m for m in spec.mul] + [C]
    expected = sum(spec.k**2 * w[i] + w[i] * w[i + 1] + bn * w[i + 1] for i in range(len(w) - 1))
  elif isinstance(spec, FacConv):
    expected = 2 * spec.k * C * C + bn * C
  elif isinstance(spec, Skip) and stride == 2:
    expected = 2 * C * (C // 2) + bn * C
  else:
    expected = 0
  assert _count(variables.get('params', {})) == expected


@pytest.mark.parametrize('kind', ['max', 'avg'])
@pytest.mark.parametrize('k,stride,size', [(3, 1, 8), (3, 2, 8), (3, 2, 9), (5, 1, 7), (5, 2, 8)])
def test_sliced_pools_match_reduce_window(kind, k, stride, size):
  """Values and gradients of the sliced pools equal flax's reduce_window forms (random inputs:
  no ties for the max)."""
  x = jax.random.normal(jax.random.key(5), (2, size, size, C))
  window = dict(window_shape=(k, k), strides=(stride, stride), padding=((k // 2,) * 2,) * 2)

  def loss(x, fn):
    return jnp.sum(jnp.sin(fn(x)) * jnp.arange(1.0, 1.0 + C))

  if kind == 'max':
    ours, ref = lambda x: ops.max_pool(x, k, stride), lambda x: nn.max_pool(x, **window)
  else:
    ours = lambda x: ops.avg_pool(x, k, stride)
    ref = lambda x: nn.avg_pool(x, **window, count_include_pad=False)
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss)(x, ours), jax.grad(loss)(x, ref), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('k,stride,size', [(3, 1, 8), (3, 2, 8), (3, 2, 9), (5, 2, 8)])
def test_max_pool_sends_a_tied_windows_gradient_to_its_first_maximum(k, stride, size):
  """Integer inputs, a ReLU's zeros among them: most windows tie. The gradient equals
  ``select_and_scatter``'s (one input per window, the first maximum in row-major order)."""
  x = jnp.maximum(jnp.round(jax.random.normal(jax.random.key(6), (2, size, size, C))), 0.0)
  window = dict(window_shape=(k, k), strides=(stride, stride), padding=((k // 2,) * 2,) * 2)
  y = nn.max_pool(x, **window)
  p, n = k // 2, y.shape[1]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  maxima = sum(xp[:, i:i + stride * n:stride, j:j + stride * n:stride] == y
               for i in range(k) for j in range(k))
  assert jnp.mean(maxima > 1) > 0.25
  g = jax.random.normal(jax.random.key(7), y.shape)
  vjp = lambda fn: jax.vjp(fn, x)[1](g)[0]
  np.testing.assert_allclose(vjp(lambda x: ops.max_pool(x, k, stride)),
                             vjp(lambda x: nn.max_pool(x, **window)), rtol=1e-6, atol=1e-6)
