"""The largest search batch that fits the device (``search.batch_size=0``), from XLA's memory
analysis of the compiled update instead of the reference's growth by trial and error."""
from __future__ import annotations

import os
from typing import Callable

import jax

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
