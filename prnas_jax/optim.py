"""What the search and the retraining steps share: the loss, the SGD transform and the
per-epoch cosine schedule (reference §6, §8)."""
from __future__ import annotations

import math

import jax
import optax


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def epoch_cosine(lr: float, lr_min: float, epochs: int, epoch: int) -> float:
  """The learning rate of ``epoch``: cosine from ``lr`` towards ``lr_min`` over ``epochs``,
  stepped once per epoch (reference §6)."""
  return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs))


def sgd_tx(clip: float, weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """Clip, coupled L2, momentum (PyTorch's SGD order); the step scales by -lr, so the learning
  rate is a step argument and a schedule never recompiles."""
  return optax.chain(optax.clip_by_global_norm(clip), *_decay_momentum(weight_decay, momentum))


def _decay_momentum(weight_decay: float, momentum: float):
  return optax.add_decayed_weights(weight_decay), optax.trace(momentum)


def sgd_part_update(params, trace, grads, norm, *, clip: float, weight_decay: float,
                    momentum: float):
  """``sgd_tx``'s update of a part of the weights: ``norm`` is the global norm of all the
  gradients (what the clip compares with ``clip``), ``trace`` the part's momentum buffer.
  Returns the update and the new buffer."""
  clipped = jax.tree.map(lambda g: jax.lax.select(norm < clip, g, g / norm * clip), grads)
  updates, (_, state) = optax.chain(*_decay_momentum(weight_decay, momentum)).update(
      clipped, (optax.EmptyState(), optax.TraceState(trace=trace)), params)
  return updates, state.trace


def momentum_buffer(opt_state):
  """The momentum buffer (a tree like the weights) of an ``sgd_tx`` state."""
  return opt_state[-1].trace


def with_momentum_buffer(opt_state, trace):
  """``opt_state`` (of ``sgd_tx``) with the momentum buffer ``trace``."""
  return (*opt_state[:-1], opt_state[-1]._replace(trace=trace))
