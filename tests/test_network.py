"""The retraining network's runs of like cells, and those runs scanned (``model.scan_cells``)
against the cells one by one."""
import jax
import numpy as np
import optax

from prnas_jax import genotype, network


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
