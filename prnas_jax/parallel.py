"""Data parallelism over every device of every process with ``jax.sharding``.

One mesh axis, ``'data'``, over ``jax.devices()``: batches are split along it, weights, batch
statistics, alphas and optimizer states are replicated. Under jit XLA then reduces the mean
loss, the gradients and BatchNorm's batch statistics over the global batch by itself, so the
step functions are the single-device ones.

Several processes (hosts) run the same command; ``initialize`` connects them through
``jax.distributed``. Each process holds its shard of the data and feeds its slice of every
global batch; every process computes the same state. Only the main process writes logs,
scalars, pictures and result files; checkpoints are written by all (orbax coordinates them).
"""
from __future__ import annotations

import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prnas_jax.errors import UserError

AXIS = 'data'


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> None:
  """Connects this process to the others of a multi-process run before JAX starts its backend.
  Arguments left ``None`` are detected by JAX on SLURM, Cloud TPU, Kubernetes and Open MPI (and
  the coordinator from ``JAX_COORDINATOR_ADDRESS``). On CPU the processes talk through gloo.

  Says on stderr what it waits for. A run that has not formed after ``timeout`` seconds ends the
  process with one line (a watchdog: JAX, given twice as long, would abort with a stack dump)."""
  what = (f'process {"?" if process_id is None else process_id} of '
          f'{"?" if num_processes is None else num_processes}, coordinator '
          f'{coordinator or "from the cluster"}')
  print(f'joining a multi-process run as {what} (up to {timeout} s)', file=sys.stderr,
        flush=True)
  watchdog = threading.Timer(timeout, _give_up, (what, timeout))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=2 * timeout + 10)
  except ValueError as e:  # nothing detected for what was left unset
    raise UserError(f'cannot join a multi-process run ({e}): outside SLURM, Cloud TPU, '
                    'Kubernetes and Open MPI pass --coordinator HOST:PORT --num_processes N '
                    '--process_id I') from e
  finally:
    watchdog.cancel()


def _give_up(what: str, timeout: int) -> None:
  sys.stderr.write(f'error: the multi-process run did not form within {timeout} s ({what}): '
                   'start every process with the same --coordinator (process 0 serves it) and '
                   '--num_processes, or wait longer with --join_timeout\n')
  sys.stderr.flush()
  os._exit(1)


def is_main_process() -> bool:
  return jax.process_index() == 0


def mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicated() -> NamedSharding:
  return NamedSharding(mesh(), PartitionSpec())


def batch_sharded() -> NamedSharding:
  return NamedSharding(mesh(), PartitionSpec(AXIS))


def _place(tree, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def replicate(tree):
  """``tree`` (the same value in every process) on every device."""
  return _place(tree, replicated())


def first_runs_cost() -> bool:
  """Whether a compiled program's first run here does costly work of its own, so that a run on
  zeros belongs before the first step: on a GPU (cuDNN builds its plans: 41 s of the H200's
  ``first/whole`` update, 69 s of the DL2 step), not on a CPU, where the first run took 1.2 s
  more than a later step and the zero runs a whole step more (docs/design.md)."""
  return jax.default_backend() != 'cpu'


def zeros_like(tree):
  """Zeros with the shapes, dtypes and shardings of ``tree`` (arrays or
  ``jax.ShapeDtypeStruct``s)."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), tree)


def shard_batch(batch):
  """The global batch whose rows this process holds ``batch``: this process's slice of it, in
  process order, split over its devices."""
  return _place(batch, batch_sharded())


def check_batch(batch_size: int, name: str) -> int:
  """This process's share of the global batch ``batch_size`` (config key ``name``); a one-line
  UserError unless every device gets the same number of examples."""
  n = jax.device_count()
  if batch_size % n:
    raise UserError(f'{name} {batch_size} does not divide among the {n} devices: use a multiple '
                    f'of {n}, e.g. --config.{name}={max(n, batch_size // n * n)}')
  return batch_size // jax.process_count()


def process_shard(arrays: dict) -> dict:
  """This process's shard of ``arrays`` (of equal length N): every ``process_count``-th row, the
  same number in every process (up to ``process_count - 1`` rows are left out)."""
  count, n = jax.process_count(), len(next(iter(arrays.values())))
  return {k: v[jax.process_index():n - n % count:count] for k, v in arrays.items()}


def barrier(name: str) -> None:
  """Waits until every process got here."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same(tree, what: str) -> None:
  """Raises unless ``tree`` is the same in every process."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(tree, f'{what} differ between processes')
