"""Times one search step (alpha step + weight step) of a supernet; prints one JSON line.

  python scripts/bench_search_step.py --config configs/dl2.py --stage first --batch 32

``first``: the prdarts4 start set on every edge; ``mid``: max/avg pool, conv(3,1,[]),
conv(3,1,[1]), conv(5,1,[]), conv(3,2,[]) on every edge. Depth and width come from the config
(8 cells, C=16 for the paper presets); images are random 32x32.
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prnas_jax import ops, search_step, space, supernet  # noqa: E402
from prnas_jax.ops import Conv, Pool  # noqa: E402

STAGES = {
    'first': ops.START_SETS['prdarts4'],
    'mid': (Pool('max', 3), Pool('avg', 3), Conv(3), Conv(3, 1, (1,)), Conv(5), Conv(3, 2)),
}
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Search config file.', lock_config=True)
_STAGE = flags.DEFINE_enum('stage', 'first', list(STAGES), 'Candidate set on every edge.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size of each split.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after one warm-up step.')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(_):
  config, batch = _CONFIG.value, _BATCH.value
  sp = space.initial_space(STAGES[_STAGE.value])
  net = supernet.build(sp, layers=config.search.layers, channels=config.search.init_channels,
                       dw_form=config.search.dw_form or None, remat=config.search.remat)
  masks = supernet.alpha_masks(net.edge_ops())
  k_init, k_alpha = jax.random.split(jax.random.key(0))
  alphas = supernet.init_alphas(k_alpha, masks)
  t0 = time.perf_counter()
  variables = supernet.init_variables(net, k_init, (32, 32, 3))
  init_s = time.perf_counter() - t0
  cfg = search_step.StepConfig(mean=(0.5,) * 3, std=(0.25,) * 3, programs=config.search.programs)
  state = search_step.create_state(variables, alphas, cfg)
  rng = np.random.default_rng(0)

  def data():
    return {'image': jax.device_put(rng.integers(0, 256, (batch, 32, 32, 3), np.uint8)),
            'label': jax.device_put(rng.integers(0, 10, batch).astype(np.int32))}

  cpu0 = _cpu_seconds()
  update, compile_s = search_step.compile_update_step(state, data(), net=net, cfg=cfg)
  compile_cores = (_cpu_seconds() - cpu0) / compile_s
  # XLA's cost analysis of the whole update (before optimisation, so equal for both program
  # layouts), twice: an alpha and a weight update per step
  lowered = search_step.update_step.lower(state, data(), np.bool_(True), np.float32(0), np.float32(0),
                                    jax.random.key(0), net=net, cfg=cfg)
  flops = 2 * (lowered.cost_analysis() or {}).get('flops', float('nan'))
  times, cpu = [], []
  for i in range(_STEPS.value + 1):
    w, a = data(), data()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    state, m = search_step.search_step(update, state, w, a, True, 0.025, 0.0,
                                       jax.random.key(i))
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
    cpu.append(_cpu_seconds() - cpu0)
  step_s = statistics.median(times[1:])
  print(json.dumps({
      'stage': _STAGE.value, 'batch': batch, 'layers': net.layers, 'channels': net.channels,
      'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
      'dw_form': net.dw_form or ops.default_dw_form(), 'remat': net.remat,
      'programs': cfg.programs,
      'init_s': round(init_s, 2), 'compile_s': round(compile_s, 2), 'step_s': round(step_s, 4),
      'images_per_s': round(batch / step_s, 2), 'flops': flops,
      'compile_cores': round(compile_cores, 2),  # CPU seconds per second: cores kept busy
      'step_cores': round(sum(cpu[1:]) / sum(times[1:]), 2),
      'flop_per_s': flops / step_s,
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
