"""Times the depthwise forms (``ops.DW_FORMS``), forward + backward; one JSON line per
(k, dilation): python scripts/bench_depthwise.py [--batch 64 --size 32 --channels 16]."""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from prnas_jax import cli, ops  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_SIZE = flags.DEFINE_integer('size', 32, 'Height and width.')
_CHANNELS = flags.DEFINE_integer('channels', 16, 'Channels.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls after a warm-up.')


def time_form(form, x, w, dilation):
  def loss(x, w):
    return jnp.sum(ops.depthwise_conv(x, w, dilation=dilation, form=form) ** 2)
  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(fn(x, w))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, w))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(_):
  c = _CHANNELS.value
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _SIZE.value, _SIZE.value, c))
  for k in (3, 5):
    for d in (1, 2):
      w = jax.random.normal(jax.random.key(1), (k, k, 1, c))
      t = {form: time_form(form, x, w, d) for form in ops.DW_FORMS}
      print(json.dumps({'k': k, 'dilation': d, 'batch': _BATCH.value, 'channels': c,
                        'backend': jax.default_backend(),
                        **{f'{f}_ms': round(1e3 * v, 3) for f, v in t.items()},
                        'grouped_over_dense': round(t['grouped'] / t['dense'], 2)}))


if __name__ == '__main__':
  cli.prepare_process()
  app.run(main)
