"""Optimizers and the jitted search and eval steps (first-order DARTS, reference §6).

One search step = an alpha step on an alpha-split batch (skipped, inside the same compiled
program, while ``train_alpha`` is false: the grace epochs), then a weight step on a weight-split
batch with the updated alphas. Batches arrive as uint8 images and are augmented inside jit.
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


def epoch_cosine(lr: float, lr_min: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """Cosine from ``lr`` towards ``lr_min``, constant within an epoch (stepped per epoch)."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return lr_min + 0.5 * (lr - lr_min) * (1 + jnp.cos(math.pi * epoch / epochs))
  return schedule


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Hyper-parameters of the search step (hashable: a static argument of the jitted steps)."""
  epochs: int
  steps_per_epoch: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  lr: float = 0.025
  lr_min: float = 0.001
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

  def weight_schedule(self) -> optax.Schedule:
    return epoch_cosine(self.lr, self.lr_min, self.epochs, self.steps_per_epoch)

  def weight_tx(self) -> optax.GradientTransformation:
    """Clip, coupled L2, SGD with momentum (PyTorch's order)."""
    return optax.chain(optax.clip_by_global_norm(self.clip),
                       optax.add_decayed_weights(self.weight_decay),
                       optax.sgd(self.weight_schedule(), self.momentum))

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


def _forward(net, cfg, params, stats, alphas, images, skip_drop, key):
  logits, new = net.apply({'params': params, 'batch_stats': stats}, images,
                          supernet.edge_weights(alphas, _masks(net)), train=True,
                          skip_drop=skip_drop if cfg.skip_dropout else None,
                          mutable=['batch_stats'], rngs={'dropout': key})
  return logits, new['batch_stats']


def _alpha_step(net, cfg, state, images, labels, skip_drop, key):
  def loss_fn(alphas):
    logits, stats = _forward(net, cfg, state.params, state.batch_stats, alphas, images,
                             skip_drop, key)
    return cross_entropy(logits, labels), stats
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.alphas)
  grads = jax.tree.map(lambda g, m: g * m, grads, _masks(net))
  updates, a_opt = cfg.alpha_tx().update(grads, state.a_opt, state.alphas)
  alphas = optax.apply_updates(state.alphas, updates)
  return state.replace(alphas=alphas, a_opt=a_opt, batch_stats=stats), loss


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames='state')
def search_step(state: SearchState, weight_batch, alpha_batch, train_alpha, skip_drop, key, *,
                net: supernet.Supernet, cfg: StepConfig):
  """One search step: the alpha step on ``alpha_batch`` when ``train_alpha`` (else skipped
  inside the same program: the grace epochs), then the weight step on ``weight_batch`` with the
  updated alphas. Batches are ``{'image': uint8 NHWC, 'label': int}``; ``skip_drop`` is the
  skip-dropout rate (used if ``cfg.skip_dropout``); ``state`` is donated."""
  key_w, key_a, drop_w, drop_a = jax.random.split(key, 4)
  aug = functools.partial(data.augment, mean=cfg.mean, std=cfg.std, crop_pad=cfg.crop_pad,
                          cutout=cfg.cutout)
  xa = aug(key_a, alpha_batch['image'])
  state, alpha_loss = jax.lax.cond(
      train_alpha,
      lambda s: _alpha_step(net, cfg, s, xa, alpha_batch['label'], skip_drop, drop_a),
      lambda s: (s, jnp.zeros((), jnp.float32)), state)

  xw, labels = aug(key_w, weight_batch['image']), weight_batch['label']

  def loss_fn(params):
    logits, stats = _forward(net, cfg, params, state.batch_stats, state.alphas, xw, skip_drop,
                             drop_w)
    return cross_entropy(logits, labels), (stats, logits)
  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, w_opt = cfg.weight_tx().update(grads, state.w_opt, state.params)
  state = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=stats,
                        w_opt=w_opt)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
             'alpha_loss': alpha_loss}
  return state, metrics


_COMPILED = {}


def compiled_search_step(state, weight_batch, alpha_batch, *, net, cfg):
  """The search step compiled ahead of time for these shapes, and the seconds it took (0 when
  an earlier stage or run in this process compiled the same program)."""
  key = (net, cfg, jax.tree.structure(state),
         tuple((x.shape, x.dtype) for x in jax.tree.leaves((state, weight_batch, alpha_batch))))
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  compiled = search_step.lower(state, weight_batch, alpha_batch, np.bool_(True), np.float32(0),
                               jax.random.key(0), net=net, cfg=cfg).compile()
  _COMPILED[key] = compiled
  return compiled, time.perf_counter() - t0


@functools.partial(jax.jit, static_argnames=('net', 'mean', 'std'))
def eval_step(state: SearchState, batch, *, net: supernet.Supernet, mean, std):
  """Summed loss, correct count and count of ``batch`` in eval mode."""
  logits = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                     data.normalize(batch['image'], mean, std),
                     supernet.edge_weights(state.alphas, _masks(net)), train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return {'loss_sum': losses.sum(), 'correct': jnp.sum(jnp.argmax(logits, -1) == batch['label']),
          'count': jnp.asarray(batch['label'].shape[0])}


