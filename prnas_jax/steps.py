"""Optimizers and the jitted search and eval steps (first-order DARTS, reference §6).

One search step = an alpha update on an alpha-split batch (skipped in the grace epochs), then a
weight update on a weight-split batch with the updated alphas; both run the same compiled
``update_step``. Batches arrive as uint8 images and are augmented inside jit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prnas_jax import data, supernet


@flax.struct.dataclass
class SearchState:
  params: Any
  batch_stats: Any
  alphas: Any
  w_opt: optax.OptState
  a_opt: optax.OptState


def epoch_cosine(lr: float, lr_min: float, epochs: int, epoch: int) -> float:
  """The learning rate of ``epoch``: cosine from ``lr`` towards ``lr_min`` over ``epochs``,
  stepped once per epoch (reference §6)."""
  return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs))


def sgd_tx(clip: float, weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """Clip, coupled L2, momentum (PyTorch's SGD order); the step scales by -lr, so the learning
  rate is a step argument and a schedule never recompiles."""
  return optax.chain(optax.clip_by_global_norm(clip), optax.add_decayed_weights(weight_decay),
                     optax.trace(momentum))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Hyper-parameters of the search step (hashable: a static argument of the jitted step).
  The weight learning rate is not among them: it is an argument of each step."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  momentum: float = 0.9
  weight_decay: float = 3e-4
  clip: float = 5.0
  alpha_lr: float = 6e-4
  alpha_b1: float = 0.5
  alpha_b2: float = 0.999
  alpha_weight_decay: float = 1e-3
  alpha_clip: float = 5.0
  crop_pad: int = 4
  cutout: int = 0
  skip_dropout: bool = False  # build the P-DARTS skip dropout (its rate is a step argument)

  def weight_tx(self) -> optax.GradientTransformation:
    return sgd_tx(self.clip, self.weight_decay, self.momentum)

  def alpha_tx(self) -> optax.GradientTransformation:
    """Clip, coupled L2, Adam."""
    return optax.chain(optax.clip_by_global_norm(self.alpha_clip),
                       optax.add_decayed_weights(self.alpha_weight_decay),
                       optax.adam(self.alpha_lr, b1=self.alpha_b1, b2=self.alpha_b2, eps=1e-8))


def create_state(variables, alphas, cfg: StepConfig) -> SearchState:
  return SearchState(variables['params'], variables['batch_stats'], alphas,
                     cfg.weight_tx().init(variables['params']), cfg.alpha_tx().init(alphas))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _masks(net):
  return {k: jnp.asarray(m) for k, m in supernet.alpha_masks(net.edge_ops()).items()}


def _select(flag, a, b):
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames='state')
def update_step(state: SearchState, batch, update_alphas, lr, skip_drop, key, *,
                net: supernet.Supernet, cfg: StepConfig):
  """One forward/backward pass on ``batch`` that updates either the alphas (Adam) or the
  weights (SGD with learning rate ``lr``); BatchNorm statistics are updated either way.

  Both gradients come from the same pass, so one compiled program serves the alpha and the
  weight half of a search step (about half the compile time of two programs; the alpha half
  also computes the unused weight gradients, as the reference does). ``state`` is donated.
  """
  k_aug, k_drop = jax.random.split(key)
  images = data.augment(k_aug, batch['image'], cfg.mean, cfg.std, crop_pad=cfg.crop_pad,
                        cutout=cfg.cutout)
  masks = _masks(net)

  def loss_fn(params, alphas):
    logits, new = net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                            supernet.edge_weights(alphas, masks), train=True,
                            skip_drop=skip_drop if cfg.skip_dropout else None,
                            mutable=['batch_stats'], rngs={'dropout': k_drop})
    return cross_entropy(logits, batch['label']), (new['batch_stats'], logits)

  (loss, (stats, logits)), (g_params, g_alphas) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.alphas)
  g_alphas = jax.tree.map(lambda g, m: g * m, g_alphas, masks)
  a_updates, a_opt = cfg.alpha_tx().update(g_alphas, state.a_opt, state.alphas)
  w_updates, w_opt = cfg.weight_tx().update(g_params, state.w_opt, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, w_updates)
  new_state = SearchState(
      params=_select(update_alphas, state.params, params), batch_stats=stats,
      alphas=_select(update_alphas, optax.apply_updates(state.alphas, a_updates), state.alphas),
      w_opt=_select(update_alphas, state.w_opt, w_opt),
      a_opt=_select(update_alphas, a_opt, state.a_opt))
  return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


_COMPILED = {}


def compile_update_step(state, batch, *, net, cfg):
  """``update_step`` compiled ahead of time for these shapes and shardings, and the seconds it
  took (0 when an earlier stage or run in this process compiled the same program)."""
  key = (net, cfg, jax.tree.structure(state),
         tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves((state, batch))))
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  compiled = update_step.lower(state, batch, np.bool_(True), np.float32(0), np.float32(0),
                               jax.random.key(0), net=net, cfg=cfg).compile()
  _COMPILED[key] = compiled
  return compiled, time.perf_counter() - t0


def search_step(update, state, weight_batch, alpha_batch, train_alpha: bool, lr, skip_drop,
                key):
  """First-order DARTS: the alpha update on ``alpha_batch`` (unless ``train_alpha`` is false:
  the grace epochs), then the weight update on ``weight_batch`` with the updated alphas.
  ``update`` is ``update_step`` or its compiled form. Returns the state and the weight half's
  metrics, plus ``alpha_loss``."""
  key_a, key_w = jax.random.split(key)
  lr, skip_drop = np.float32(lr), np.float32(skip_drop)
  alpha_loss = jnp.zeros(())
  if train_alpha:
    state, m = update(state, alpha_batch, np.bool_(True), lr, skip_drop, key_a)
    alpha_loss = m['loss']
  state, m = update(state, weight_batch, np.bool_(False), lr, skip_drop, key_w)
  return state, {**m, 'alpha_loss': alpha_loss}


@functools.partial(jax.jit, static_argnames=('net', 'mean', 'std'))
def eval_step(state: SearchState, batch, *, net: supernet.Supernet, mean, std):
  """Summed loss, correct count and count of ``batch`` in eval mode."""
  logits = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                     data.normalize(batch['image'], mean, std),
                     supernet.edge_weights(state.alphas, _masks(net)), train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return {'loss_sum': losses.sum(), 'correct': jnp.sum(jnp.argmax(logits, -1) == batch['label']),
          'count': jnp.asarray(batch['label'].shape[0])}




# ---------------------------------------------------------------------------------------------
# Retraining a genotype (reference §8).

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
