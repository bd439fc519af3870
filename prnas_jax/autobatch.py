"""The largest search batch that fits the device (``search.batch_size=0``), from XLA's memory
analysis of the compiled update (``update_memory``) instead of the reference's growth by trial
and error."""
from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax import parallel, pieces, search_step
from prnas_jax.errors import UserError


def device_memory() -> int:
  """Bytes one device may hold: the allocator's limit on GPU and TPU; on CPU the host's
  physical memory shared by its devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // jax.local_device_count()


def fit_batch_size(memory_at: Callable[[int], int], limit: int, multiple: int, cap: int) -> int:
  """The largest multiple of ``multiple`` up to ``cap`` whose ``memory_at(batch)`` bytes stay
  within ``limit``, from the straight line through the memory at ``multiple`` and at twice that
  (activations grow with the batch, the state does not)."""
  small = memory_at(multiple)
  if small > limit:
    raise UserError(f'the search step needs {small / 2**30:.2f} GiB per device at the smallest '
                    f'batch ({multiple}), more than the {limit / 2**30:.2f} GiB allowed: raise '
                    'search.memory_fraction, or make the supernet smaller (search.layers, '
                    'search.init_channels)')
  top = cap // multiple * multiple
  if top <= multiple:
    return multiple
  per_example = max(memory_at(2 * multiple) - small, 1) / multiple
  fits = multiple + int((limit - small) / per_example) // multiple * multiple
  return max(multiple, min(fits, top))


def search_batch(state, net, cfg, image_shape, cap: int, fraction: float) -> tuple[int, int]:
  """The largest global batch, a multiple of 8 and of the device count up to ``cap``, whose
  search update (``net``, ``cfg``, images of ``image_shape``) fits ``fraction`` of a device, and
  that limit in bytes."""
  sharding = parallel.batch_sharded()

  def memory_at(b):
    batch = {'image': jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8, sharding=sharding),
             'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)}
    return update_memory(state, batch, net=net, cfg=cfg)

  limit = int(fraction * device_memory())
  multiple = int(np.lcm(8, jax.device_count()))
  return int(fit_batch_size(memory_at, limit, multiple, cap)), limit


def update_memory(state, batch, *, net, cfg) -> int:
  """Bytes one update of these shapes needs on each device, from XLA's memory analysis of its
  compiled programs. One program: its arguments, outputs and temporaries. ``pieces``: the state
  and batch, every forward piece's outputs (each pullback lives until the backward pass reaches
  it) and the largest outputs plus temporaries of one program. ``state`` and ``batch`` may be
  abstract (``jax.ShapeDtypeStruct`` with shardings)."""
  if cfg.programs == 'whole':
    m = search_step.update_step.lower(*pieces.abstract((state, batch)), *search_step.probe_args(),
                                      net=net, cfg=cfg).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
  walk = pieces.Lowering()  # a weight update: it holds the gradients
  search_step.PieceUpdate(net, cfg)(*pieces.abstract((state, batch)),
                                    *search_step.probe_args(False), call=walk)
  memory = {k: low.compile().memory_analysis() for k, low in walk.lowered.items()}
  kept = sum(memory[k].output_size_in_bytes for k, forward in walk.calls if forward)
  largest = max(m.output_size_in_bytes + m.temp_size_in_bytes for m in memory.values())
  return _device_bytes((state, batch)) + kept + largest


def _device_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))
