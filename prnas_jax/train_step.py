"""The retraining step of a genotype's network (reference §8) and its test step."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prnas_jax import data, parallel
from prnas_jax.optim import sgd_tx


@flax.struct.dataclass
class TrainState:
  params: Any
  batch_stats: Any
  opt: optax.OptState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static hyper-parameters of the retraining step (the learning rate and drop-path rate are
  step arguments). ``augment``: ``'cifar'`` = pad-crop, flip, cutout inside the step;
  ``'imagenet'`` = the batch arrives cropped and flipped, colour jitter inside the step."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  momentum: float = 0.9
  weight_decay: float = 3e-4
  clip: float = 5.0
  aux_weight: float = 0.4
  label_smoothing: float = 0.0
  augment: str = 'cifar'
  cutout: int = 16
  color_jitter: float = 0.4
  hue_jitter: float = 0.2

  @classmethod
  def from_config(cls, config, mean, std, augment: str) -> TrainConfig:
    """The step of the retraining config ``config`` for data normalised by ``mean`` and
    ``std``."""
    return cls(mean=tuple(mean), std=tuple(std), momentum=config.momentum,
               weight_decay=config.weight_decay, clip=config.clip,
               aux_weight=config.model.aux_weight, label_smoothing=config.label_smoothing,
               cutout=config.cutout, augment=augment)

  def tx(self) -> optax.GradientTransformation:
    return sgd_tx(self.clip, self.weight_decay, self.momentum)


def create_train_state(variables, cfg: TrainConfig) -> TrainState:
  return TrainState(variables['params'], variables['batch_stats'], cfg.tx().init(
      variables['params']))


def smoothed_cross_entropy(logits, labels, smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames='state')
def train_step(state: TrainState, batch, lr, drop_rate, key, *, net, cfg: TrainConfig):
  """One SGD step of the retraining network on ``batch`` (uint8 images, augmented here); the
  loss adds ``aux_weight`` times the auxiliary head's. ``state`` is donated."""
  k_aug, k_drop = jax.random.split(key)
  if cfg.augment == 'cifar':
    images = data.augment(k_aug, batch['image'], cfg.mean, cfg.std, cutout=cfg.cutout)
  else:
    images = data.color_jitter(k_aug, batch['image'], cfg.mean, cfg.std, cfg.color_jitter,
                               cfg.hue_jitter)

  def loss_fn(params):
    (logits, aux), new = net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                   train=True, drop_rate=drop_rate, mutable=['batch_stats'],
                                   rngs={'drop_path': k_drop})
    loss = smoothed_cross_entropy(logits, batch['label'], cfg.label_smoothing)
    if aux is not None:
      loss = loss + cfg.aux_weight * smoothed_cross_entropy(aux, batch['label'],
                                                            cfg.label_smoothing)
    return loss, (new['batch_stats'], logits)

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt = cfg.tx().update(grads, state.opt, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
  return TrainState(params, stats, opt), {
      'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def compile_train_step(state: TrainState, batch, *, net, cfg: TrainConfig):
  """``train_step`` compiled ahead of time for the shapes and shardings of ``state`` and
  ``batch`` (arrays or ``jax.ShapeDtypeStruct``s) and run once on zeros, so that the first step
  does no first-run work (cuDNN's plans: 69 s for DL2 on the H200, README), and the seconds
  both took."""
  t0 = time.perf_counter()
  args = np.float32(0), np.float32(0), jax.random.key(0)
  step = train_step.lower(state, batch, *args, net=net, cfg=cfg).compile()
  jax.block_until_ready(step(parallel.zeros_like(state), parallel.zeros_like(batch), *args))
  return step, time.perf_counter() - t0


@functools.partial(jax.jit, static_argnames=('net', 'mean', 'std'))
def test_step(state: TrainState, batch, *, net, mean, std):
  """Summed plain cross-entropy, correct count and count of ``batch`` in eval mode; examples
  with label -1 (padding of the last batch) are left out."""
  logits, _ = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                        data.normalize(batch['image'], mean, std), train=False)
  valid = batch['label'] >= 0
  labels = jnp.where(valid, batch['label'], 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'loss_sum': jnp.sum(losses * valid),
          'correct': jnp.sum((jnp.argmax(logits, -1) == labels) & valid),
          'count': jnp.sum(valid)}
