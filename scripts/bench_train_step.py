"""Times the retraining step of a genotype's network; prints one JSON line.

  python scripts/bench_train_step.py --config configs/train_cifar.py --config.genotype=DL2 --batch 128

Depth, width, auxiliary head and drop-path come from the config (20 cells, C=36 for CIFAR);
images are random, 32x32 for the CIFAR stem and ``image_size`` for the ImageNet one.
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prnas_jax import data, network, ops, train, train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after one warm-up step.')


def main(_):
  config, batch = _CONFIG.value, _BATCH.value
  size = config.image_size or 32
  net = train.build_network(config, data.num_classes(config.data))
  cfg = train_step.TrainConfig(mean=(0.5,) * 3, std=(0.25,) * 3, cutout=config.cutout,
                          label_smoothing=config.label_smoothing,
                          augment='imagenet' if config.model.stem == 'imagenet' else 'cifar')
  t0 = time.perf_counter()
  key = jax.random.key(0, impl='unsafe_rbg')
  variables = jax.jit(lambda k: net.init({'params': k, 'drop_path': k},
                                         jnp.zeros((1, size, size, 3)), train=True))(key)
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  state = train_step.create_train_state(variables, cfg)
  rng = np.random.default_rng(0)

  def batch_data():
    return {'image': jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8)),
            'label': jax.device_put(rng.integers(0, net.num_classes, batch).astype(np.int32))}

  t0 = time.perf_counter()
  step = train_step.train_step.lower(state, batch_data(), np.float32(0), np.float32(0),
                                jax.random.key(0), net=net, cfg=cfg).compile()
  compile_s = time.perf_counter() - t0
  flops = (step.cost_analysis() or {}).get('flops', float('nan'))
  times = []
  for i in range(_STEPS.value + 1):
    b = batch_data()
    t0 = time.perf_counter()
    state, m = step(state, b, np.float32(0.025), np.float32(0.1), jax.random.key(i))
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  print(json.dumps({
      'genotype': config.genotype, 'batch': batch, 'layers': net.layers,
      'channels': net.channels, 'params': network.param_count(state.params),
      'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
      'dw_form': net.dw_form or ops.default_dw_form(), 'init_s': round(init_s, 2),
      'compile_s': round(compile_s, 2), 'step_s': round(step_s, 4),
      'images_per_s': round(batch / step_s, 2), 'flops': flops, 'flop_per_s': flops / step_s,
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
