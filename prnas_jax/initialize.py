"""Fresh variables of a Flax module with nothing of its forward pass compiled or run: from the
shapes of an abstract ``init`` (``jax.eval_shape``), each leaf filled by the rule for its name, the
initialiser that flax's ``Conv``, ``Dense`` and ``BatchNorm`` and ``prnas_jax.ops`` declare:
kernels LeCun normal (truncated to two standard deviations), biases and means zeros, scales and
variances ones. All the kernels share one draw of jax's truncated normal, compiled once per
power-of-two size (docs/design.md, "Program layouts", time to the first step)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

ONES, ZEROS = frozenset({'scale', 'var'}), frozenset({'bias', 'mean'})
TRUNCATED_STD = .87962566103423978  # of the standard normal truncated to [-2, 2]


@functools.partial(jax.jit, static_argnums=1)
def _standard(key, size: int):
  return jax.random.truncated_normal(key, -2.0, 2.0, (size,), jnp.float32)


def variables(shapes, key) -> dict:
  """Variables of the shapes ``shapes`` (``jax.eval_shape`` of a module's ``init``) drawn from
  ``key`` with the initialisers ``init`` uses; the kernels take their part of the draw in the
  order of their paths, whatever order built the tree."""
  shapes = dict(sorted(traverse_util.flatten_dict(shapes).items()))
  unknown = [p for p in shapes if p[-1] not in ONES | ZEROS | {'kernel'}]
  if unknown:
    raise ValueError(f'no initialiser rule for the variable {"/".join(unknown[0])}: add one '
                     'to prnas_jax.initialize')
  total = sum(math.prod(x.shape) for p, x in shapes.items() if p[-1] == 'kernel')
  draws = np.asarray(_standard(key, 1 << max(total - 1, 0).bit_length()))
  out, offset = {}, 0
  for path, x in shapes.items():
    if path[-1] == 'kernel':  # LeCun normal: variance 1 / fan_in, fan_in all but the last axis
      size = math.prod(x.shape)
      std = 1 / math.sqrt(size // x.shape[-1]) / TRUNCATED_STD
      out[path] = (draws[offset:offset + size].reshape(x.shape) * std).astype(x.dtype)
      offset += size
    else:
      out[path] = (np.ones if path[-1] in ONES else np.zeros)(x.shape, x.dtype)
  return jax.device_put(traverse_util.unflatten_dict(out))
