"""The automatic search batch (``search.batch_size=0``): the line through two probes, the
pieces' memory analysis, and a stage's pick inside ``Search``."""
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from prnas_jax import autobatch, ops, parallel, search, search_step, space, supernet
from prnas_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _linear(base, per_example, calls):
  def memory_at(b):
    calls.append(b)
    return base + per_example * b
  return memory_at


def test_fit_follows_the_line_through_two_probes():
  calls = []
  # 100 + 10 b <= 1000: b <= 90, so 88 (a multiple of 8), from probes at 8 and 16 only
  assert autobatch.fit_batch_size(_linear(100, 10, calls), 1000, 8, 128) == 88
  assert calls == [8, 16]
  assert autobatch.fit_batch_size(_linear(100, 10, []), 1000, 8, 60) == 56  # capped
  assert autobatch.fit_batch_size(_linear(100, 10, []), 1000, 16, 128) == 80  # 16 devices


def test_fit_refuses_when_the_smallest_batch_does_not_fit():
  calls = []
  with pytest.raises(UserError, match=r'^the search step needs .* GiB per device at the '
                     r'smallest batch \(8\).*search.memory_fraction'):
    autobatch.fit_batch_size(_linear(2**30, 2**28, calls), 2**30, 8, 128)
  assert calls == [8]


def test_device_memory_is_known():
  assert autobatch.device_memory() > 2**28


def _tiny():
  """The supernet of the search below (its pieces' analyses are kept per process)."""
  net = supernet.build(space.initial_space(ops.START_SETS['prdarts4']), layers=3, channels=4,
                       remat=True)
  alphas = supernet.init_alphas(jax.random.key(1), supernet.alpha_masks(net.edge_ops()))
  cfg = search_step.StepConfig(mean=(0.5,) * 3, std=(0.25,) * 3)
  state = search_step.create_state(supernet.init_variables(net, jax.random.key(0), (32, 32, 3)),
                             alphas, cfg)
  return net, parallel.replicate(state), cfg


def _batch(b):
  sharding = parallel.batch_sharded()
  return {'image': jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8, sharding=sharding),
          'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)}


def test_piece_memory_is_the_state_plus_a_share_per_example():
  """XLA's analysis of the per-piece programs: the state and batch, plus about the same amount
  per example at batch 8 and 16 (what the fit's straight line assumes)."""
  net, state, cfg = _tiny()
  m8, m16 = (autobatch.update_memory(state, _batch(b), net=net, cfg=cfg) for b in (8, 16))
  base = autobatch._device_bytes(state)
  assert m16 - m8 == pytest.approx(m8 - base, rel=0.25)
  assert m16 - m8 > 8 * 32 * 32 * 4 * 4  # at least one stored 4-channel activation per example


def test_a_stage_picks_the_largest_batch_that_fits(cifar_subset, tmp_path, monkeypatch):
  config = runpy.run_path(str(ROOT / 'configs' / 'tiny.py'))['get_config']()
  with config.unlocked():
    config.data.dataset, config.data.folder, config.data.max_train = 'folder', str(
        cifar_subset), 200
    config.search.layers, config.search.init_channels = 3, 4
    config.search.batch_size, config.search.max_batch_size = 0, 20
  run = search.Search(config, tmp_path, search.load_data(config))
  net = run.supernet(0)
  state = parallel.replicate(run.new_state(0, net, supernet.init_variables(
      net, jax.random.key(0), run.splits.image_shape), jax.random.key(1)))
  monkeypatch.setattr(autobatch, 'device_memory', lambda: 2**40)
  assert run.fit_batch(0, net, state) == 16  # the largest multiple of 8 up to 20
  monkeypatch.setattr(autobatch, 'device_memory', lambda: 2**20)
  with pytest.raises(UserError, match='smallest batch'):
    run.fit_batch(0, net, state)
  run.checkpoints.close()
