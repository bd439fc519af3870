"""What the search and the retraining steps share: the loss, the SGD transform and the
per-epoch cosine schedule (reference §6, §8)."""
from __future__ import annotations

import math

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
  return optax.chain(optax.clip_by_global_norm(clip), optax.add_decayed_weights(weight_decay),
                     optax.trace(momentum))
