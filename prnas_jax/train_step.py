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

from prnas_jax import data, parallel, pieces
from prnas_jax.optim import sgd_tx
from prnas_jax.pieces import merge, select


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
  programs: str = 'whole'  # 'whole': train_step; 'pieces': PieceTrainStep (program_layout)

  @classmethod
  def from_config(cls, config, mean, std, augment: str) -> TrainConfig:
    """The step of the retraining config ``config`` for data normalised by ``mean`` and
    ``std``."""
    return cls(mean=tuple(mean), std=tuple(std), momentum=config.momentum,
               weight_decay=config.weight_decay, clip=config.clip,
               aux_weight=config.model.aux_weight, label_smoothing=config.label_smoothing,
               cutout=config.cutout, augment=augment,
               programs=program_layout(config.model.programs, config.model.scan_cells))

  def tx(self) -> optax.GradientTransformation:
    return sgd_tx(self.clip, self.weight_decay, self.momentum)


def program_layout(programs: str, scan_cells: bool = False) -> str:
  """The layout ``programs`` (``model.programs``) names; ``'auto'``: ``'pieces'`` on a CPU
  (DL2 compiled 4.5x faster there and stepped as fast: docs/design.md, "Program layouts")
  unless the cells are scanned, else ``'whole'``."""
  if programs != 'auto':
    return programs
  return 'pieces' if jax.default_backend() == 'cpu' and not scan_cells else 'whole'


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
  images, k_drop = _augment(key, batch['image'], cfg)

  def loss_fn(params):
    (logits, aux), new = net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                   train=True, drop_rate=drop_rate, mutable=['batch_stats'],
                                   rngs={'drop_path': k_drop})
    return _loss(logits, aux, batch['label'], cfg), (new['batch_stats'], logits)

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt = cfg.tx().update(grads, state.opt, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
  return TrainState(params, stats, opt), _metrics(loss, logits, batch['label'])


def _augment(key, image, cfg: TrainConfig):
  """The augmented, normalised images of one step and its drop-path key."""
  k_aug, k_drop = jax.random.split(key)
  if cfg.augment == 'cifar':
    return data.augment(k_aug, image, cfg.mean, cfg.std, cutout=cfg.cutout), k_drop
  return data.color_jitter(k_aug, image, cfg.mean, cfg.std, cfg.color_jitter,
                           cfg.hue_jitter), k_drop


_prepare = jax.jit(_augment, static_argnames='cfg')


def _loss(logits, aux, labels, cfg: TrainConfig):
  """The loss of the logits plus ``aux_weight`` times that of the auxiliary logits (if any)."""
  loss = smoothed_cross_entropy(logits, labels, cfg.label_smoothing)
  if aux is not None:
    loss = loss + cfg.aux_weight * smoothed_cross_entropy(aux, labels, cfg.label_smoothing)
  return loss


def _metrics(loss, logits, labels):
  return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}


@functools.partial(jax.jit, static_argnames=('module', 'cfg'))
def _head_loss(params, x, aux, labels, *, module, cfg: TrainConfig):
  """The classifier ``module`` on ``x`` and the loss (``_loss``): the metrics and the loss's
  gradients with respect to ``params`` (with their squared norm), ``x`` and the auxiliary
  logits ``aux``."""
  def fn(params, x, aux):
    logits = module.apply({'params': params}, x)
    return _loss(logits, aux, labels, cfg), logits
  (loss, logits), (g_params, *g_inputs) = jax.value_and_grad(
      fn, argnums=(0, 1, 2), has_aux=True)(params, x, aux)
  return _metrics(loss, logits, labels), (pieces.with_squared_norm(g_params), *g_inputs)


class PieceTrainStep:
  """``train_step`` (same arguments and results; drop-path masks drawn per piece) as a chain
  of compiled programs (``Network.pieces``, the piece engine of the search's ``PieceUpdate``):
  augmentation, the stem, each cell (the cells of one run share their programs), the auxiliary
  head, the classifier with the loss, the pullbacks in reverse, SGD one piece at a time. Its
  programs are small and compile in parallel (``compile_train_step``)."""

  def __init__(self, net, cfg: TrainConfig):
    self.net, self.cfg = net, cfg
    *self.body, self.head = net.pieces()

  def __call__(self, state: TrainState, batch, lr, drop_rate, key, call=None):
    """``call(program, *args, **static)`` runs each program (default: ``pieces.default_hook``)."""
    call = call or pieces.default_hook()
    images, k_drop = call(_prepare, key, batch['image'], cfg=self.cfg)
    new_stats, pullbacks = [], []

    def apply(i, piece, inputs):
      out, stats, pullback = call(
          pieces.forward_program, select(state.params, piece), select(state.batch_stats, piece),
          inputs, pieces.constants(piece), drop_rate, k_drop, np.int32(i), None,
          module=piece.module, rate=piece.rate, remat=self.net.remat)
      new_stats.append((piece, stats))
      pullbacks.append(pullback)
      return out

    (features,) = self.head.inputs
    values = pieces.forward(self.body, {'images': images}, apply, call, keep=(features,))
    metrics, (g_head, g_features, g_aux) = call(
        _head_loss, select(state.params, self.head), values[features], values.get('aux_logits'),
        batch['label'], module=self.head.module, cfg=self.cfg)
    grads, _ = pieces.backward(self.body, pullbacks, {features: g_features} | (
        {} if g_aux is None else {'aux_logits': g_aux}), call)
    by_name = {p.name: p for p in self.body}
    params, opt = pieces.sgd(state.params, state.opt, [(self.head, g_head)] + [
        (by_name[n], g) for n, g in grads.items()], lr, call, self.cfg)
    return TrainState(params, merge(new_stats), opt), metrics


def compile_train_step(state: TrainState, batch, *, net, cfg: TrainConfig):
  """The training step for the shapes and shardings of ``state`` and ``batch`` (arrays or
  ``jax.ShapeDtypeStruct``s): ``train_step`` compiled ahead of time, or with
  ``cfg.programs='pieces'`` a ``PieceTrainStep`` whose programs were compiled in parallel
  (``pieces.compile_in_parallel``); either run once on zeros where first runs cost
  (``parallel.first_runs_cost``: cuDNN's plans, 69 s for DL2 on the H200). Returns it and the
  seconds this took."""
  t0 = time.perf_counter()
  args = np.float32(0), np.float32(0), jax.random.key(0)
  if cfg.programs == 'pieces':
    step = PieceTrainStep(net, cfg)
    pieces.compile_in_parallel(lambda hook, state, batch: step(state, batch, *args, call=hook),
                               state, batch)
  else:
    step = train_step.lower(state, batch, *args, net=net, cfg=cfg).compile()
  if parallel.first_runs_cost():
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
