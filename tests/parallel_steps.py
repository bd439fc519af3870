"""``PYTHONPATH=. python tests/parallel_steps.py``, run by test_parallel.py in a fresh process
with several (fake CPU) devices: a search step and a retraining step (whole and as pieces) of
tiny networks, on one device and on the mesh of all devices with the same global batch and
key. Prints one JSON object: the piece engine's hook, losses, the largest difference of any
state leaf, whether the mesh state stayed replicated and the batch sharded, and images/s of
warm steps."""
import dataclasses
import json
import time

import jax
import numpy as np

from prnas_jax import (genotype, network, parallel, pieces, search_step, space, supernet,
                       train_step)

jax.config.update('jax_default_matmul_precision', 'highest')
jax.config.update('jax_disable_most_optimizations', True)  # compile time dominates here

BATCH, TIMED = 16, 3
CFG = search_step.StepConfig(mean=(0.5,) * 3, std=(0.25,) * 3)
TRAIN_CFG = train_step.TrainConfig(mean=(0.5,) * 3, std=(0.25,) * 3, cutout=4)


def _batches(n):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (BATCH, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, BATCH).astype(np.int32)} for _ in range(n)]


def _on_one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def _run(step, state, batches, place_state, place_batch):
  """Step 1's metrics and state, and the images/s of ``TIMED`` further steps."""
  state, m = step(place_state(state), *map(place_batch, batches[0]), jax.random.key(1))
  first = jax.device_get((m, state))
  t0 = time.perf_counter()
  for i in range(TIMED):
    state, m = step(state, *map(place_batch, batches[1 + i]), jax.random.key(2 + i))
  jax.block_until_ready(state)
  return first, state, TIMED * BATCH / (time.perf_counter() - t0)


def _compare(name, step, state, batches):
  (m1, s1), _, ips1 = _run(step, state, batches, _on_one_device, _on_one_device)
  (m8, s8), state8, ips8 = _run(step, state, batches, parallel.replicate, parallel.shard_batch)
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b), initial=0)), s1, s8)
  rep, sharded = parallel.replicated(), parallel.batch_sharded()
  image = parallel.shard_batch(batches[0][0])['image']
  return {f'{name}_loss_1': float(m1['loss']), f'{name}_loss_n': float(m8['loss']),
          f'{name}_max_state_diff': max(jax.tree.leaves(diff)),
          f'{name}_replicated': all(x.sharding.is_equivalent_to(rep, x.ndim)
                                    for x in jax.tree.leaves(state8)),
          f'{name}_batch_sharded': image.sharding.is_equivalent_to(sharded, 4) and {
              s.data.shape[0] for s in image.addressable_shards} == {BATCH // jax.device_count()},
          f'{name}_images_per_s_1': ips1, f'{name}_images_per_s_n': ips8}


def search():
  # Optimised compile here: with jax_disable_most_optimizations, XLA's 8-device program of the
  # grouped and shifted-slice depthwise forms (not the dense one) moves the gradients by ~0.5 %
  # against every 1-device program; optimised, all forms agree to 4e-7 (measured in session 3).
  jax.config.update('jax_disable_most_optimizations', False)
  net = supernet.build(space.initial_space('prdarts4'), layers=3, channels=4)
  masks = supernet.alpha_masks(net.edge_ops())
  variables = supernet.init_variables(net, jax.random.key(0), (16, 16, 3))
  state = jax.device_get(search_step.create_state(
      variables, supernet.init_alphas(jax.random.key(3), masks), CFG))
  b = _batches(2 * (1 + TIMED))
  batches = list(zip(b[::2], b[1::2]))

  def step(state, weight_batch, alpha_batch, key):
    update, _ = search_step.compile_update_step(state, weight_batch, net=net, cfg=CFG)
    return search_step.search_step(update, state, weight_batch, alpha_batch, True, 0.025, 0.0,
                                   key)
  result = _compare('search', step, state, batches)
  jax.config.update('jax_disable_most_optimizations', True)
  return result


def train():
  net = network.Network(genotype.load('DARTS_V2'), layers=3, channels=4, num_classes=10,
                        auxiliary=False)
  variables = net.init({'params': jax.random.key(0), 'drop_path': jax.random.key(0)},
                       np.zeros((1, 16, 16, 3), np.float32), train=True)
  state = jax.device_get(train_step.create_train_state(variables, TRAIN_CFG))
  args = np.float32(0.025), np.float32(0.1)
  pieced = train_step.PieceTrainStep(net, dataclasses.replace(TRAIN_CFG, programs='pieces'))
  batches = [(b,) for b in _batches(1 + TIMED)]
  return {**_compare('train', lambda state, batch, key: train_step.train_step(
      state, batch, *args, key, net=net, cfg=TRAIN_CFG), state, batches),
          **_compare('train_pieces', lambda state, batch, key: pieced(state, batch, *args, key),
                     state, batches)}


if __name__ == '__main__':
  print(json.dumps({'devices': jax.device_count(), 'hook': pieces.default_hook().__name__,
                    **search(), **train()}))
