"""The retraining network's runs of like cells, those runs scanned (``model.scan_cells``)
against the cells one by one, and the training step as pieces (``model.programs``) against the
whole step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prnas_jax import genotype, network, parallel, pieces, train, train_step
from prnas_jax.config import train_config


def test_runs_of_like_cells():
  layouts = network.cells.layouts(20, 36)
  dl2 = genotype.load('DL2')
  assert network.runs(layouts, dl2, 'cifar', 36, 3, 13) == [
      range(0, 1), range(1, 2), range(2, 6), range(6, 7), range(7, 8), range(8, 13),
      range(13, 14), range(14, 15), range(15, 20)]
  assert network.runs(layouts, dl2, 'cifar', 36, 3, 11)[5:7] == [range(8, 12), range(12, 13)]
  imagenet = network.cells.layouts(14, 48, reduction_prev=True)
  assert network.runs(imagenet, dl2, 'imagenet', 48, 3, 9)[:4] == [
      range(0, 1), range(1, 2), range(2, 4), range(4, 5)]


def test_scanned_cells_equal_cells_one_by_one():
  """Runs of like cells as one scan each (with and without remat): the logits, auxiliary
  logits, new batch statistics and gradients of the network cell by cell."""
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  y = np.array([1, 7])
  cell = [('conv(k=3,d=1,mul=[])', 0), ('skip_connect', 1), ('max_pool_3x3', 0),
          ('conv(k=3,d=1,mul=[])', 2)]
  plain = network.Network(genotype.Genotype(cell, (2, 3), cell, (2, 3)), layers=12, channels=4)
  rngs = {'drop_path': jax.random.key(1)}
  variables = jax.jit(lambda: plain.init({'params': jax.random.key(0), **rngs}, x, train=True))()

  def loss(params, net):
    (logits, aux), new = net.apply({**variables, 'params': params}, x, train=True,
                                   mutable=['batch_stats'], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() + aux.sum(), (
        logits, aux, new)

  def run(net):
    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        variables['params'], net)

  want = run(plain)
  for remat in (False, True):
    net = plain.clone(scan_cells=True, remat=remat)
    jaxpr = str(jax.make_jaxpr(lambda p: loss(p, net))(variables['params']))
    assert jaxpr.count(' scan[') == 3  # cells 2-3, 6-7, 10-11
    got = run(net)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5 * np.abs(b).max()), got, want)
  evaluate = jax.jit(lambda net: net.apply(variables, x, train=False)[0], static_argnums=0)
  np.testing.assert_allclose(evaluate(net), evaluate(plain), rtol=1e-5, atol=1e-5)


def _train_setup(stem: str, layers: int, auxiliary: bool, size: int):
  """A DL2 network of ``layers`` cells, C=4, its state and one batch of 4 ``size``-pixel images,
  placed as the runs place them."""
  config = train_config()
  config.model.update(stem=stem, layers=layers, init_channels=4, auxiliary=auxiliary)
  net = train.build_network(config, 10, (size, size, 3))
  cfg = dataclasses.replace(train_step.TrainConfig.from_config(
      config, (0.5,) * 3, (0.25,) * 3, 'cifar' if stem == 'cifar' else 'imagenet'),
      programs='whole')
  state = parallel.replicate(train.initial_state(net, cfg, 0, (size, size, 3)))
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({'image': rng.integers(0, 256, (4, size, size, 3), np.uint8),
                                'label': rng.integers(0, 10, 4).astype(np.int32)})
  return net, cfg, state, batch


@pytest.mark.parametrize('stem, layers, auxiliary, size', [
    ('cifar', 5, True, 32), ('cifar', 3, True, 32), ('imagenet', 5, False, 64)])
def test_piece_step_equals_the_whole_step(stem, layers, auxiliary, size):
  """``model.programs='pieces'``: after the compile, a step compiles nothing and gives the
  whole step's weights, statistics, momentum and metrics (drop-path off: its masks are drawn
  per piece). With 3 cells the auxiliary head reads the last cell, as the classifier does."""
  net, cfg, state, batch = _train_setup(stem, layers, auxiliary, size)
  pieced = dataclasses.replace(cfg, programs='pieces')
  step, _ = train_step.compile_train_step(state, batch, net=net, cfg=pieced)
  assert isinstance(step, train_step.PieceTrainStep)
  args = np.float32(0.1), np.float32(0.0), jax.random.key(3)
  compiled, fresh = [], jax.tree.map(jnp.copy, state)

  def listen(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiled.append(kwargs.get('fun_name'))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    got, got_metrics = step(fresh, batch, *args)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiled == []
  want, want_metrics = train_step.train_step(jax.tree.map(jnp.copy, state), batch, *args,
                                             net=net, cfg=cfg)
  np.testing.assert_allclose(got_metrics['loss'], want_metrics['loss'], rtol=1e-5)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_piece_step_shares_the_programs_of_a_run():
  """Each run of like cells (``runs``) is one forward program: with the stem and the auxiliary
  head, DL2 in 11 cells (9 runs) lowers 1 + 9 + 1 of them, walked without compiling."""
  net, cfg, state, batch = _train_setup('cifar', 11, True, 32)
  assert len(network.runs(network.cells.layouts(11, 4), net.genotype, 'cifar', 4, 3, 7)) == 9
  hook = pieces.Lowering()
  train_step.PieceTrainStep(net, dataclasses.replace(cfg, programs='pieces'))(
      *pieces.abstract((state, batch)), np.float32(0.1), np.float32(0.2), jax.random.key(0),
      call=hook)
  assert sum(program is pieces.forward_program for program, *_ in hook.lowered) == 11
  assert sum(is_forward for _, is_forward in hook.calls) == 13  # stem, 11 cells, aux


@pytest.mark.parametrize('backend, scan_cells, layout', [
    ('cpu', False, 'pieces'), ('cpu', True, 'whole'), ('gpu', False, 'whole'),
    ('tpu', False, 'whole')])
def test_auto_layout_follows_the_backend(monkeypatch, backend, scan_cells, layout):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert train_step.program_layout('auto', scan_cells) == layout
  assert train_step.program_layout('whole') == 'whole'
