"""The supernet, its alphas and masks, carry-over by name, and the jitted search step."""
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from prnas_jax import cells, initialize, optim, parallel, pieces, search_step, space, supernet
from prnas_jax.config import PROGRAMS
from prnas_jax.ops import Conv

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CFG = search_step.StepConfig(mean=MEAN, std=STD)


def _space():
  """prdarts4 everywhere except normal edge 0, which lost skip: a masked column there."""
  sp = space.initial_space('prdarts4')
  sp['normal'].remaining[0, 2] = False
  return sp


def _net(sp):
  return supernet.build(sp, layers=3, channels=4)


def _random_space(specs, seed, density):
  """A space of ``specs`` whose every edge keeps each spec with probability ``density``, and at
  least one: edges with different candidate lists, as a search leaves them."""
  rng = np.random.default_rng(seed)
  return {kind: space.CellSpace.from_json({
      'candidates': specs, 'remaining': (rng.random((14, len(specs))) < density) | (
          np.arange(len(specs)) == rng.integers(0, len(specs), (14, 1))),
      'discovered': np.ones((14, len(specs))), 'parents': [{}] * 14, 'pending': [[]] * 14})
      for kind in ('normal', 'reduce')}


def _batch(seed, n=8):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


@pytest.fixture(scope='module')
def tiny():
  sp = _space()
  net = _net(sp)
  masks = supernet.alpha_masks(net.edge_ops())
  alphas = supernet.init_alphas(jax.random.key(0), masks)
  x = jnp.zeros((2, 16, 16, 3))
  variables = net.init(jax.random.key(1), x, supernet.edge_weights(alphas, masks), train=False)
  return sp, net, masks, alphas, variables


def test_layout_and_names(tiny):
  _, net, masks, alphas, variables = tiny
  assert [l.reduction for l in cells.layouts(8, 16)] == [0, 0, 1, 0, 0, 1, 0, 0]
  assert [l.channels for l in cells.layouts(8, 16)] == [16, 16, 32, 32, 32, 64, 64, 64]
  assert masks['normal'].shape == (14, 4) and masks['reduce'].shape == (14, 4)
  assert masks['normal'][0].tolist() == [True, True, True, False]
  assert masks['reduce'].all()
  cell0 = variables['params']['cell0']
  assert set(cell0['edge0']) == {'conv(k=3,d=1,mul=[])'}  # pools and identity skip: no params
  assert set(variables['batch_stats']['cell0']['edge0']) == {
      'pool(max,3)', 'pool(avg,3)', 'conv(k=3,d=1,mul=[])'}
  assert set(variables['params']['cell1']['edge0']) == {'skip', 'conv(k=3,d=1,mul=[])'}
  assert set(variables['params']['cell1']['edge4']) == {'conv(k=3,d=1,mul=[])'}  # from node 0
  assert set(variables['params']['cell1']['pre0']) == {'conv'}
  assert set(variables['params']['cell2']['pre0']) == {'conv1', 'conv2'}  # after a reduction
  assert variables['params']['head']['kernel'].shape == (4 * 16, 10)


def test_init_variables_draw_as_flax_init(tiny):
  """Every variable as ``net.init`` draws it, nothing of the forward pass run: the same tree,
  constants equal, and the kernels of each shape pooled with LeCun normal's spread (that of
  ``init``'s), truncated at two standard deviations; the same key draws the same values."""
  _, net, _, _, variables = tiny
  fresh = supernet.init_variables(net, jax.random.key(1), (16, 16, 3))
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  pooled = {}
  expected = traverse_util.flatten_dict(variables)
  for path, a in traverse_util.flatten_dict(fresh).items():
    b = expected[path]
    assert a.shape == b.shape and a.dtype == b.dtype, path
    if path[-1] == 'kernel':
      ours, theirs = pooled.setdefault(a.shape, ([], []))
      ours.append(np.ravel(a))
      theirs.append(np.ravel(b))
    else:
      np.testing.assert_array_equal(a, b, err_msg=str(path))
  compared = 0
  for shape, (ours, theirs) in pooled.items():
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    std = 1 / np.sqrt(np.prod(shape[:-1]))  # of LeCun normal: variance 1 / fan_in
    assert np.abs(ours).max() <= 2 * std / initialize.TRUNCATED_STD + 1e-6, shape
    if ours.size >= 2000:
      np.testing.assert_allclose([ours.std(), theirs.std()], std, rtol=0.06, err_msg=str(shape))
      assert abs(ours.mean()) < 0.1 * std, shape
      compared += 1
  assert compared >= 3
  again = supernet.init_variables(net, jax.random.key(1), (16, 16, 3))
  jax.tree.map(np.testing.assert_array_equal, again, fresh)


def test_variable_shapes_of_a_searched_space_are_inits(tiny):
  """The shapes walked piece by piece are ``net.init``'s, in a space whose edges hold different
  candidate lists (morphed ones among them), with rematerialised cells."""
  specs = ['pool(max,3)', 'pool(avg,3)', 'skip', 'conv(k=3,d=1,mul=[])', 'conv(k=3,d=2,mul=[])',
           'conv(k=3,d=1,mul=[1])', 'conv(k=5,d=1,mul=[])', 'conv(k=3,d=1,mul=[2])']
  net = supernet.build(_random_space(specs, 0, 0.4), layers=4, channels=4, remat=True)
  masks = supernet.alpha_masks(net.edge_ops())
  inits = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
      supernet.edge_weights(supernet.init_alphas(jax.random.key(1), masks), masks), train=False))
  walked = supernet.variable_shapes(net, (16, 16, 3))
  assert jax.tree.structure(walked) == jax.tree.structure(inits)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(walked)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(inits)]
  assert len({tuple(e) for e in net.normal}) > 5


def test_fused_edges_equal_edge_by_edge():
  """A node's candidates of one spec on its edges side by side (``fuse_edges``, with and
  without remat): the logits, new batch statistics and gradients of the supernet edge by edge,
  with fewer operations, in a space whose edges hold different candidate lists (widened and
  factorised convs, zero, a pool, skips; strided edges in the reduction cells)."""
  specs = ['pool(max,3)', 'skip', 'none', 'conv(k=3,d=1,mul=[])', 'conv(k=3,d=1,mul=[2])',
           'fac_conv(3)']
  plain = supernet.build(_random_space(specs, 1, 0.5), layers=3, channels=4)
  masks = supernet.alpha_masks(plain.edge_ops())
  alphas = supernet.init_alphas(jax.random.key(1), masks, scale=1.0)
  variables = supernet.init_variables(plain, jax.random.key(2), (16, 16, 3))
  variables['batch_stats'] = jax.tree.map(lambda v: v + 0.5, variables['batch_stats'])
  batch = _batch(4)
  x = batch['image'].astype(jnp.float32) / 255

  @functools.partial(jax.jit, static_argnums=0)
  def run(net):
    def loss(alphas, params):
      logits, new = net.apply({**variables, 'params': params}, x,
                              supernet.edge_weights(alphas, masks), train=True,
                              mutable=['batch_stats'])
      return optim.cross_entropy(logits, batch['label']), (logits, new)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(alphas, variables['params'])

  want = run(plain)
  for remat in (False, True):
    got = run(plain.clone(fuse_edges=True, remat=remat))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
  fused = plain.clone(fuse_edges=True)
  evaluate = [jax.jit(lambda net=net: net.apply(variables, x, supernet.edge_weights(
      alphas, masks), train=False))() for net in (plain, fused)]
  np.testing.assert_allclose(evaluate[1], evaluate[0], rtol=1e-4, atol=1e-5)
  equations = [str(jax.make_jaxpr(lambda: net.apply(variables, x, supernet.edge_weights(
      alphas, masks), train=False))()).count('\n') for net in (plain, fused)]
  assert equations[1] < 0.85 * equations[0], equations  # fewer, wider operations


def test_init_draw_does_not_depend_on_the_order_of_the_tree():
  shape = jax.ShapeDtypeStruct
  one = {'b': {'kernel': shape((3, 4), jnp.float32)},
         'a': {'kernel': shape((5, 2), jnp.float32), 'bias': shape((2,), jnp.float32)}}
  other = {'a': {'bias': shape((2,), jnp.float32), 'kernel': shape((5, 2), jnp.float32)},
           'b': {'kernel': shape((3, 4), jnp.float32)}}
  x, y = (initialize.variables(t, jax.random.key(3)) for t in (one, other))
  jax.tree.map(np.testing.assert_array_equal, x, y)
  assert not np.array_equal(x['a']['kernel'].ravel()[:8], x['b']['kernel'].ravel()[:8])


def test_a_variable_without_an_initialiser_rule_is_named():
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param('gain', nn.initializers.ones, (1,))
  with pytest.raises(ValueError, match='gain.*prnas_jax.initialize'):
    initialize.variables(jax.eval_shape(Odd().init, jax.random.key(0), jnp.ones((1, 2))),
                         jax.random.key(0))


def test_masked_columns_get_zero_probability_and_gradient(tiny):
  _, net, masks, alphas, variables = tiny
  alphas = {k: a.at[0, 3].set(5.0) for k, a in alphas.items()}  # a masked value never matters
  w = supernet.edge_weights(alphas, masks)
  assert w['normal'][0, 3] == 0.0
  np.testing.assert_allclose(w['normal'].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w['normal'][0, :3], 1 / 3, rtol=5e-3)

  batch = _batch(0)
  x = batch['image'].astype(jnp.float32) / 255

  def loss(alphas, params):
    logits, _ = net.apply({**variables, 'params': params}, x,
                          supernet.edge_weights(alphas, masks), train=True,
                          mutable=['batch_stats'])
    return optim.cross_entropy(logits, batch['label'])

  g_alpha, g_params = jax.grad(loss, argnums=(0, 1))(alphas, variables['params'])
  assert g_alpha['normal'][0, 3] == 0.0
  assert np.all(np.abs(g_alpha['normal'][masks['normal']]) > 0)
  assert np.all(np.abs(g_alpha['reduce']) > 0)
  # the alpha pytree holds only alphas and the weight pytree only weights
  assert jax.tree.structure(g_alpha) == jax.tree.structure(alphas)
  assert jax.tree.structure(g_params) == jax.tree.structure(variables['params'])


@pytest.fixture(scope='module')
def stepped(tiny):
  """Runs the search step (one compiled program) with and without the alpha update."""
  _, net, masks, alphas, variables = tiny
  state0 = search_step.create_state(variables, alphas, CFG)
  copy = lambda s: jax.tree.map(jnp.copy, s)
  update, _ = search_step.compile_update_step(state0, _batch(1), net=net, cfg=CFG)
  run = lambda train_alpha: search_step.search_step(update, copy(state0), _batch(1), _batch(2),
                                              train_alpha, 0.025, 0.0, jax.random.key(3))
  weights_only, m1 = run(False)
  both, m2 = run(True)
  return state0, weights_only, both, m1, m2


def test_grace_step_leaves_alphas_alone(stepped):
  state0, weights_only, _, m1, _ = stepped
  jax.tree.map(np.testing.assert_array_equal, weights_only.alphas, state0.alphas)
  jax.tree.map(np.testing.assert_array_equal, weights_only.a_opt, state0.a_opt)
  assert m1['alpha_loss'] == 0.0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), weights_only.params, state0.params)
  assert all(jax.tree.leaves(changed))


def test_alpha_step_moves_only_real_alpha_columns(stepped, tiny):
  state0, _, both, _, m2 = stepped
  masks = tiny[2]
  for kind in ('normal', 'reduce'):
    moved = np.asarray(both.alphas[kind] != state0.alphas[kind])
    assert np.array_equal(moved, masks[kind])
  assert both.alphas['normal'][0, 3] == 0.0
  assert np.isfinite(m2['alpha_loss']) and m2['alpha_loss'] > 0


def test_weight_step_sees_the_updated_alphas(stepped):
  _, weights_only, both, m1, m2 = stepped
  assert m1['loss'] != m2['loss']
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), weights_only.params,
                                          both.params)))


def test_weight_schedule_is_an_epoch_cosine():
  lrs = [optim.epoch_cosine(0.025, 0.01, 4, e) for e in range(4)]
  assert lrs[0] == pytest.approx(0.025) and lrs[2] == pytest.approx(0.0175)
  assert lrs[3] == pytest.approx(0.01 + 0.0075 * (1 + np.cos(3 * np.pi / 4)))


def test_step_compiles_once_per_program(tiny, stepped):
  _, net, _, alphas, variables = tiny
  state = search_step.create_state(variables, alphas, CFG)
  update, seconds = search_step.compile_update_step(state, _batch(5), net=net, cfg=CFG)
  assert seconds == 0.0  # the fixture compiled these programs already
  jitted = (search_step._prepare, search_step._edge_weights, pieces.forward_program,
            pieces.pull, pieces.pull_inputs, pieces.add, search_step._head_loss,
            search_step._adam_alphas, pieces._root_of_sum, pieces._piece_sgd)
  sizes = [f._cache_size() for f in jitted]
  search_step.search_step(update, jax.tree.map(jnp.copy, state), _batch(6), _batch(7), True, 0.01,
                    0.0, jax.random.key(8))
  assert [f._cache_size() for f in jitted] == sizes  # no piece traced or compiled again


def _compiles(run):
  """The programs that ``run()`` compiled or read from the persistent cache."""
  compiled = []

  def listen(event, duration, **kwargs):
    if event in ('/jax/core/compile/backend_compile_duration',
                 '/jax/compilation_cache/cache_retrieval_time_sec'):
      compiled.append((event, kwargs.get('fun_name')))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    run()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return compiled


def test_precompiled_programs_serve_the_first_updates_and_evaluation(tiny):
  """``precompile`` (compile_update_step's compile in a thread pool) and ``compile_eval_step``
  leave nothing to compile or to read from the persistent cache for an alpha update, a weight
  update and an evaluation placed as the search places them; for arrays not committed to the
  device they do nothing."""
  net = supernet.build(tiny[0], layers=2, channels=4)  # programs that no other test compiles
  cfg = dataclasses.replace(CFG, programs='edges')
  variables = supernet.init_variables(net, jax.random.key(1), (16, 16, 3))
  alphas = supernet.init_alphas(jax.random.key(2), supernet.alpha_masks(net.edge_ops()))
  uncommitted = search_step.create_state(variables, alphas, cfg), _batch(1)
  assert _compiles(lambda: search_step.precompile(*uncommitted, net, cfg)) == []
  assert _compiles(lambda: search_step.compile_eval_step(*uncommitted, net=net, cfg=cfg)) == []
  state, batch = parallel.replicate(uncommitted[0]), parallel.shard_batch(uncommitted[1])
  assert _compiles(lambda: search_step.precompile(state, batch, net, cfg))
  assert _compiles(lambda: search_step.compile_eval_step(state, batch, net=net, cfg=cfg))
  assert search_step.compile_eval_step(state, batch, net=net, cfg=cfg) == 0.0  # once

  def run():
    s = state
    update = search_step.PieceUpdate(net, cfg)
    for update_alphas in (True, False):
      s, _ = update(s, batch, *search_step.probe_args(update_alphas))
    jax.block_until_ready(search_step.eval_step(s, batch, net=net, mean=MEAN, std=STD,
                                                programs='edges'))
  assert _compiles(run) == []


def test_whole_layout_compiles_its_evaluation_beside_the_update(tiny):
  """In the whole layout the evaluation compiles in another thread while the update compiles,
  and that program serves the evaluation: it compiles once. ``compile_eval_step`` alone, for
  another batch placed as the search places it, compiles the program that serves that one."""
  net = supernet.build(tiny[0], layers=2, channels=4, remat=True)  # compiled by no other test
  cfg = dataclasses.replace(CFG, programs='whole')
  state = search_step.create_state(supernet.init_variables(net, jax.random.key(1), (16, 16, 3)),
                                   supernet.init_alphas(jax.random.key(2), supernet.alpha_masks(
                                       net.edge_ops())), cfg)
  threads = {}

  def listen(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      threads.setdefault(kwargs.get('fun_name'), []).append(threading.get_ident())
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    search_step.compile_update_step(state, _batch(1), net=net, cfg=cfg)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert search_step.compile_eval_step(state, _batch(1), net=net, cfg=cfg) == 0.0
  assert threads['jit(update_step)'] == [threading.get_ident()]
  assert len(threads['jit(_eval_whole)']) == 1
  assert threads['jit(_eval_whole)'][0] != threading.get_ident()
  state, other = parallel.replicate(state), parallel.shard_batch(_batch(2, n=4))
  assert search_step.compile_eval_step(state, other, net=net, cfg=cfg) > 0
  assert _compiles(lambda: jax.block_until_ready(search_step.eval_step(
      state, other, net=net, mean=MEAN, std=STD, programs='whole'))) == []


def test_alpha_update_skips_the_weight_gradients(tiny, stepped):
  """An alpha update pulls back to the pieces' inputs only: its pullback programs leave out the
  weights' gradients, and XLA counts clearly fewer operations in them than in a weight
  update's."""
  _, net, _, alphas, variables = tiny
  flops = {pieces.pull: 0.0, pieces.pull_inputs: 0.0}

  def count(program, *args, **static):
    if program in flops:
      flops[program] += program.lower(*args, **static).cost_analysis().get('flops', 0.0)
    return program(*args, **static)
  update = search_step.PieceUpdate(net, CFG)
  state = search_step.create_state(jax.tree.map(jnp.copy, variables),
                                   jax.tree.map(jnp.copy, alphas), CFG)
  for alpha_update in (True, False):
    state, _ = update(state, _batch(1), *search_step.probe_args(alpha_update), call=count)
  assert 0 < flops[pieces.pull_inputs] < 0.9 * flops[pieces.pull]  # 0.83 at this size


def test_weightless_pieces_pull_back_with_the_weight_updates_program(tiny):
  """In an alpha update the pieces without parameters (pools, the identity skip, a cell's
  concatenation) run ``pull``, the program their weight update compiled, and only the others
  ``pull_inputs``."""
  _, net, _, alphas, variables = tiny
  update = search_step.PieceUpdate(net.clone(remat=True),  # compiled by the next test too
                                   dataclasses.replace(CFG, programs='candidates'))
  calls = []

  def record(program, *args, **static):
    if program in (pieces.pull, pieces.pull_inputs):
      calls.append(program)
    return program(*args, **static)
  state = search_step.create_state(jax.tree.map(jnp.copy, variables),
                                   jax.tree.map(jnp.copy, alphas), CFG)
  update(state, _batch(1), *search_step.probe_args(True), call=record)
  weightless = [not pieces.select(variables['params'], p) for p in update.body]
  assert 0 < sum(weightless) < len(weightless)
  assert calls[::-1] == [pieces.pull if w else pieces.pull_inputs for w in weightless]


def test_piece_programs_equal_the_whole_program(tiny, stepped):
  """The chain of per-piece programs, with and without recomputation in the pullbacks, gives
  the single program's state and metrics (an alpha update, then a weight update), and the same
  evaluation."""
  _, net, _, alphas, variables = tiny
  whole_cfg = dataclasses.replace(CFG, programs='whole')
  state0 = search_step.create_state(jax.tree.map(jnp.copy, variables), jax.tree.map(jnp.copy, alphas),
                              whole_cfg)
  update, _ = search_step.compile_update_step(state0, _batch(1), net=net, cfg=whole_cfg)
  expected = search_step.search_step(update, state0, _batch(1), _batch(2), True, 0.025, 0.0,
                               jax.random.key(3))
  remat = net.clone(remat=True)  # each piece recomputed in its pullback
  got = [(stepped[2], stepped[4])]
  for cfg in (CFG, *(dataclasses.replace(CFG, programs=p) for p in ('edges', 'candidates')),
              dataclasses.replace(CFG, programs='edges', full_alpha_pullback=True)):
    state0 = search_step.create_state(jax.tree.map(jnp.copy, variables),
                                jax.tree.map(jnp.copy, alphas), cfg)
    update, _ = search_step.compile_update_step(state0, _batch(1), net=remat, cfg=cfg)
    got.append(search_step.search_step(update, state0, _batch(1), _batch(2), True, 0.025, 0.0,
                                 jax.random.key(3)))
  for result in got:
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(result)):
      np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
  evals = [search_step.eval_step(stepped[2], _batch(4), net=net, mean=MEAN, std=STD, programs=p)
           for p in PROGRAMS if p != 'auto']
  for other in evals[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), evals[0], other)


def test_a_full_alpha_pullback_runs_the_weight_updates_programs(tiny, stepped):
  """With ``full_alpha_pullback`` an alpha update pulls back with ``pull`` only, the programs
  of the weight update (nothing compiles again), its kernel gradients switched off."""
  _, net, _, alphas, variables = tiny
  cfg = dataclasses.replace(CFG, programs='edges', full_alpha_pullback=True)
  net = net.clone(remat=True)  # as test_piece_programs_equal_the_whole_program compiled it
  calls = []

  def record(program, *args, **static):
    calls.append((program, args))
    return program(*args, **static)
  state = search_step.create_state(jax.tree.map(jnp.copy, variables),
                                   jax.tree.map(jnp.copy, alphas), cfg)
  update = search_step.PieceUpdate(net, cfg)
  state, _ = update(state, _batch(1), *search_step.probe_args(False))
  sizes = [p._cache_size() for p in (pieces.forward_program, pieces.pull)]
  update(state, _batch(1), *search_step.probe_args(True), call=record)
  programs = [program for program, _ in calls]
  assert pieces.pull in programs and pieces.pull_inputs not in programs
  assert [p._cache_size() for p in (pieces.forward_program, pieces.pull)] == sizes
  flags = [args[7] for program, args in calls if program is pieces.forward_program]
  assert flags and not any(flags)


def test_auto_alpha_pullback_weighs_alpha_updates_against_programs(tiny):
  """'auto' is 'full' on a CPU below ``FULL_PULLBACK_BELOW`` alpha updates per distinct piece
  program, else (and without the stage's supernet, or for the single program) 'inputs'; a named
  setting is kept."""
  net = tiny[1]
  distinct = len({p.module for p in net.pieces('edges')[:-1]})
  assert 1 < distinct < len(net.pieces('edges')) - 1  # equal edges share a program
  pullback, below = search_step.alpha_pullback, search_step.FULL_PULLBACK_BELOW
  assert pullback('auto', 'edges', net, below * distinct - 1) == 'full'
  assert pullback('auto', 'edges', net, below * distinct) == 'inputs'
  assert pullback('auto', 'edges') == pullback('auto', 'whole', net, 1) == 'inputs'
  assert pullback('full', 'pieces') == 'full' and pullback('inputs', 'edges', net, 1) == 'inputs'


def test_auto_layout_takes_edges_on_a_cpu():
  """'auto' is 'edges' on the CPU, where these tests run; a named layout is kept."""
  assert jax.default_backend() == 'cpu'
  assert [search_step.program_layout(p) for p in PROGRAMS] == [
      'edges', 'pieces', 'edges', 'candidates', 'whole']


def test_cells_of_one_type_and_width_share_their_programs():
  net = _net(_space()).clone(layers=8)
  modules = {p.name: p.module for p in net.pieces()}
  assert len(modules) == 1 + 2 * 8 + 1
  assert modules['cell3/nodes'] == modules['cell4/nodes']  # cell 3 follows a reduction, 4 not
  assert hash(modules['cell0/nodes']) == hash(modules['cell1/nodes'])
  assert modules['cell3/pre'] != modules['cell4/pre']
  assert len(set(m for name, m in modules.items() if name.endswith('/nodes'))) == 5
  # one Candidate per spec, stride and width over all 8 cells and 14 edges: prdarts4 (4 specs)
  # at C=4, 8, 16 with stride 1, and stride 2 into the two reduction cells
  per_candidate = net.pieces('candidates')
  # stem, head, per cell its preprocessing and concat, and a piece per candidate of each edge
  # (six normal cells lack skip on edge 0)
  assert len(per_candidate) == 2 + 8 * 2 + 6 * (14 * 4 - 1) + 2 * 14 * 4
  candidates = {p.module for p in per_candidate if isinstance(p.module, supernet.Candidate)}
  assert len(candidates) == 4 * 3 + 4 * 2
  # one Edge per candidate list, stride and width: normal edge 0 lacks skip (two lists at C=4,
  # 8, 16); the reduction cells' edges from their inputs have stride 2 (C=8, 16), their other
  # edges equal the normal cells' prdarts4 edges of the same width
  per_edge = net.pieces('edges')
  assert len(per_edge) == 2 + 8 * 2 + 8 * 14
  edges = {p.module for p in per_edge if isinstance(p.module, supernet.Edge)}
  assert len(edges) == 2 * 3 + 2


def test_weight_update_is_sgd_with_momentum(tiny):
  """The weight half equals a hand-written PyTorch-style SGD step on the same gradients."""
  _, net, masks, alphas, variables = tiny
  state = search_step.create_state(variables, alphas, CFG)
  update, _ = search_step.compile_update_step(state, _batch(1), net=net, cfg=CFG)
  before = jax.tree.map(jnp.copy, state.params)
  new, _ = update(jax.tree.map(jnp.copy, state), _batch(1), np.bool_(False), np.float32(0.1),
                  np.float32(0), jax.random.key(4))
  buffers = jax.tree.leaves(new.w_opt)  # after one step: clipped gradient + wd * params
  assert len(buffers) == len(jax.tree.leaves(before))
  for p0, p1, buf in zip(jax.tree.leaves(before), jax.tree.leaves(new.params), buffers):
    np.testing.assert_allclose(p1, p0 - 0.1 * buf, rtol=1e-6, atol=1e-7)


def test_rebuild_with_a_pruned_candidate_keeps_other_weights(tiny):
  sp, net, masks, alphas, variables = tiny
  sp2 = _space()
  sp2['reduce'].remaining[3, 0] = False  # prune max-pool on reduce edge 3
  net2 = _net(sp2)
  template = supernet.init_variables(net2, jax.random.key(7), (16, 16, 3))
  carried = supernet.carry_over(variables, template)
  old, new = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(carried)
  assert set(old) - set(new) == {('batch_stats', c, 'edge3', 'pool(max,3)', 'bn', k)
                                 for c in ('cell1', 'cell2') for k in ('mean', 'var')}
  assert set(new) <= set(old)
  for k, v in new.items():
    np.testing.assert_array_equal(v, old[k])  # bit-identical
    assert v.dtype == old[k].dtype


def test_new_candidates_start_fresh_or_from_their_parent(tiny):
  sp, net, masks, alphas, variables = tiny
  sp2 = _space()
  cell = sp2['normal']
  child = cell.column(Conv(5))
  cell.discovered[4, child] = True
  cell.parents[4][child] = 3
  cell.pending[4].add(child)
  net2 = _net(sp2)
  template = supernet.init_variables(net2, jax.random.key(7), (16, 16, 3))
  carried = supernet.carry_over(variables, template)
  name = str(Conv(5))
  np.testing.assert_array_equal(carried['params']['cell0']['edge4'][name]['unit0']['dw']['kernel'],
                                template['params']['cell0']['edge4'][name]['unit0']['dw']['kernel'])
  transfers = {'normal': [(e, cell.candidates[p], cell.candidates[c])
                          for e, p, c in cell.transfers()]}
  assert transfers['normal'] == [(4, Conv(3), Conv(5))]
  inited = supernet.init_from_parents(carried, net2, transfers, jax.random.key(9))
  for i in (0,):  # cell 0 is the only normal cell of three
    parent = inited['params'][f'cell{i}']['edge4'][str(Conv(3))]['unit0']['dw']['kernel']
    grown = inited['params'][f'cell{i}']['edge4'][name]['unit0']['dw']['kernel']
    np.testing.assert_array_equal(grown[1:-1, 1:-1], parent)
    assert not np.any(grown[0]) and not np.any(grown[:, -1])
  # reduce cells are untouched
  jax.tree.map(np.testing.assert_array_equal, inited['params']['cell1'], carried['params']['cell1'])


def test_eval_step(tiny, stepped):
  _, net, *_ = tiny
  out = search_step.eval_step(stepped[2], _batch(4), net=net, mean=MEAN, std=STD)
  assert int(out['count']) == 8 and 0 <= int(out['correct']) <= 8
  assert np.isfinite(out['loss_sum'])


def test_skip_dropout_drops_only_the_identity_skip(tiny):
  _, net, masks, alphas, variables = tiny
  x = _batch(6)['image'].astype(jnp.float32) / 255
  w = supernet.edge_weights(alphas, masks)

  def apply(rate, seed=0):
    y, _ = net.apply(variables, x, w, train=True, skip_drop=rate, mutable=['batch_stats'],
                     rngs={'dropout': jax.random.key(seed)})
    return y

  plain, _ = net.apply(variables, x, w, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(apply(0.0), plain, rtol=1e-5, atol=1e-6)  # rate 0: no change
  assert np.max(np.abs(apply(0.9) - plain)) > 1e-3
  assert np.max(np.abs(apply(0.9, 1) - apply(0.9, 2))) > 1e-3  # a fresh mask per key
  no_skip = _space()
  for cell in no_skip.values():
    cell.remaining[:, 2] = False  # no skip anywhere: dropout has nothing to drop
  net2 = _net(no_skip)
  m2 = supernet.alpha_masks(net2.edge_ops())
  w2 = supernet.edge_weights(supernet.init_alphas(jax.random.key(0), m2), m2)
  v2 = supernet.carry_over(variables,
                          supernet.init_variables(net2, jax.random.key(1), (16, 16, 3)))
  a, _ = net2.apply(v2, x, w2, train=True, skip_drop=0.9, mutable=['batch_stats'],
                    rngs={'dropout': jax.random.key(0)})
  b, _ = net2.apply(v2, x, w2, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_keeps_names_values_and_gradients(tiny):
  _, net, masks, alphas, variables = tiny
  remat = net.clone(remat=True)
  batch = _batch(3)
  x = batch['image'].astype(jnp.float32) / 255
  assert jax.tree.structure(remat.init(jax.random.key(1), x, supernet.edge_weights(
      alphas, masks), train=False)) == jax.tree.structure(variables)

  def grads(model):
    def loss(alphas, params):
      logits, _ = model.apply({**variables, 'params': params}, x,
                              supernet.edge_weights(alphas, masks), train=True,
                              mutable=['batch_stats'])
      return optim.cross_entropy(logits, batch['label'])
    return jax.value_and_grad(loss, argnums=(0, 1))(alphas, variables['params'])

  for a, b in zip(jax.tree.leaves(grads(net)), jax.tree.leaves(grads(remat)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # recomputation reorders sums
