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
from prnas_jax.space import NODES


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
  programs: str = 'pieces'  # 'pieces', 'candidates': PieceUpdate; 'whole': update_step

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
  images, k_drop = _augment(key, batch['image'], cfg)
  masks = _masks(net)

  def loss_fn(params, alphas):
    logits, new = net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                            supernet.edge_weights(alphas, masks), train=True,
                            skip_drop=skip_drop if cfg.skip_dropout else None,
                            mutable=['batch_stats'], rngs={'dropout': k_drop})
    return cross_entropy(logits, batch['label']), (new['batch_stats'], logits)

  (loss, (stats, logits)), (g_params, g_alphas) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.alphas)
  new_state = _apply_gradients(state, g_params, g_alphas, stats, update_alphas, lr, masks, cfg)
  return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def _apply_gradients(state, g_params, g_alphas, stats, update_alphas, lr, masks, cfg):
  """Adam on the alphas or SGD on the weights, as ``update_alphas`` says; new statistics."""
  g_alphas = jax.tree.map(lambda g, m: g * m, g_alphas, masks)
  a_updates, a_opt = cfg.alpha_tx().update(g_alphas, state.a_opt, state.alphas)
  w_updates, w_opt = cfg.weight_tx().update(g_params, state.w_opt, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, w_updates)
  return SearchState(
      params=_select(update_alphas, state.params, params), batch_stats=stats,
      alphas=_select(update_alphas, optax.apply_updates(state.alphas, a_updates), state.alphas),
      w_opt=_select(update_alphas, state.w_opt, w_opt),
      a_opt=_select(update_alphas, a_opt, state.a_opt))


# One compiled program per supernet piece (``Supernet.pieces``) instead of one for the whole
# update: XLA's compile time grows faster than the program (design.md: about cells^1.7), and the
# cells of one type and width share their programs.

def _augment(key, image, cfg: StepConfig):
  """The augmented, normalised images of one update and its dropout key."""
  k_aug, k_drop = jax.random.split(key)
  return data.augment(k_aug, image, cfg.mean, cfg.std, crop_pad=cfg.crop_pad,
                      cutout=cfg.cutout), k_drop


_prepare = jax.jit(_augment, static_argnames='cfg')


@functools.partial(jax.jit, static_argnames='net')
def _edge_weights(alphas, *, net):
  return supernet.edge_weights(alphas, _masks(net))


@functools.partial(jax.jit, static_argnames=('module', 'skip_dropout', 'remat'))
def _piece_forward(params, stats, inputs, skip_drop, key, index, *, module, skip_dropout: bool,
                   remat: bool):
  """``module`` in training mode on ``inputs`` (dropout key: ``key`` folded with the piece's
  ``index``): its output, new BatchNorm statistics and the pullback from the output's gradient
  to those of ``params`` and ``inputs``. With ``remat`` the
  pullback keeps only the inputs and recomputes the forward pass (on the CPU less memory and
  a faster step: XLA fuses the recomputation into the backward pass instead of reading stored
  intermediates)."""
  extra = {'skip_drop': skip_drop} if skip_dropout else {}

  def fn(params, inputs):
    out, new = module.apply({'params': params, 'batch_stats': stats}, *inputs, train=True,
                            mutable=['batch_stats'],
                            rngs={'dropout': jax.random.fold_in(key, index)}, **extra)
    return out, new['batch_stats']

  out, pullback, new_stats = jax.vjp(jax.checkpoint(fn) if remat else fn, params, inputs,
                                     has_aux=True)
  return out, new_stats, pullback


@jax.jit
def _pull(pullback, g):
  return pullback(g)


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


@jax.jit
def _concat(states):
  return jnp.concatenate(states, axis=-1)


@functools.partial(jax.jit, static_argnames='n')
def _split(g, *, n):
  return tuple(jnp.split(g, n, axis=-1))


@functools.partial(jax.jit, static_argnames='module')
def _head_loss(params, x, labels, *, module):
  def fn(params, x):
    logits = module.apply({'params': params}, x)
    return cross_entropy(logits, labels), logits
  (loss, logits), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(params, x)
  return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}, grads


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames='state')
def _finish(state, g_params, g_weights, stats, update_alphas, lr, *, net, cfg):
  """The optimizers; ``g_weights`` of a cell type without cells (None) is zero."""
  masks = _masks(net)
  g_weights = {k: jnp.zeros_like(a) if g_weights[k] is None else g_weights[k]
               for k, a in state.alphas.items()}
  _, pullback = jax.vjp(lambda a: supernet.edge_weights(a, masks), state.alphas)
  return _apply_gradients(state, g_params, pullback(g_weights)[0], stats, update_alphas, lr,
                          masks, cfg)


def _kind(module: supernet.CellNodes) -> str:
  return 'reduce' if module.layout.reduction else 'normal'


def _forward_chain(pieces, images, weights, forward):
  """Feeds each piece but the head its inputs in order; ``forward(i, name, module, inputs)``
  applies piece ``i``. Returns the outputs of the stem and of every cell."""
  outputs = []
  for i, (name, module) in enumerate(pieces[:-1]):
    if name == 'stem':
      inputs = (images,)
    elif name.endswith('/pre'):  # the two newest states: [stem, stem, cell0, cell1, ...]
      inputs = (outputs[max(len(outputs) - 2, 0)], outputs[-1])
    else:
      inputs = (*outputs.pop(), weights[_kind(module)])
    outputs.append(forward(i, name, module, inputs))
  return outputs


def _call(program, *args, **static):
  return program(*args, **static)


def _candidate_chain(nodes, cell: str, s0, s1, weights, apply, call=_call):
  """The nodes of ``cell`` (a ``CellNodes``) one ``Candidate`` at a time:
  ``apply(name, candidate, inputs, n)`` runs the ``n``-th on ``(x, weights, (e, col))``.
  Returns the cell's output and the tape ``[(name, node, input state)]`` in order."""
  states, tape = [s0, s1], []
  for node, candidates in enumerate(supernet.node_candidates(nodes)):
    acc = None
    for e, j, col, candidate in candidates:
      name = f'{cell}/edge{e}/{candidate.spec}'
      y = apply(name, candidate, (states[j], weights, np.array([e, col], np.int32)), len(tape))
      acc = y if acc is None else call(_add, acc, y)
      tape.append((name, node, j))
    states.append(acc)
  return call(_concat, states[2:]), tape


class PieceUpdate:
  """``update_step`` (same arguments and results, within float tolerance) as a chain of
  compiled programs: augmentation, the stem, each cell's preprocessing and nodes, the head with
  the loss, their pullbacks in reverse, then the optimizers (``state`` donated). With
  ``cfg.programs == 'candidates'`` each cell's nodes are one ``Candidate`` program per spec,
  stride and width shared by all edges and cells (2.3x faster to compile, 15 % slower to run on
  the CPU: README), plus jitted sums. Every array operation runs inside a program, so the chain
  can also be walked with abstract arrays (``update_memory``)."""

  def __init__(self, net: supernet.Supernet, cfg: StepConfig):
    self.net, self.cfg = net, cfg
    self.pieces = net.pieces()

  def __call__(self, state, batch, update_alphas, lr, skip_drop, key, call=_call):
    """``call(program, *args, **static)`` runs each program (the default: calls it)."""
    images, k_drop = call(_prepare, key, batch['image'], cfg=self.cfg)
    new_stats, pullbacks = {}, []

    def apply(i, name, module, inputs):
      out, new_stats[name], pullback = call(
          _piece_forward, supernet.select(state.params, name),
          supernet.select(state.batch_stats, name), inputs, skip_drop, k_drop, np.int32(i),
          module=module, skip_dropout=self.cfg.skip_dropout and isinstance(
              module, (supernet.CellNodes, supernet.Candidate)), remat=self.net.remat)
      return out, pullback

    def forward(i, name, module, inputs):
      if self.cfg.programs == 'candidates' and name.endswith('/nodes'):
        pulls = []

        def candidate(c_name, c, c_inputs, n):
          out, pullback = apply(1000 * i + n, c_name, c, c_inputs)
          pulls.append(pullback)
          return out

        out, tape = _candidate_chain(module, name.split('/')[0], *inputs, candidate, call)
        pullbacks.append((name, (tape, pulls)))
        return out
      out, pullback = apply(i, name, module, inputs)
      pullbacks.append((name, pullback))
      return out

    def add(a, b):
      return b if a is None else call(_add, a, b)

    outputs = _forward_chain(self.pieces, images,
                             call(_edge_weights, state.alphas, net=self.net), forward)
    head_name, head = self.pieces[-1]
    metrics, (g_head, g_out) = call(_head_loss, supernet.select(state.params, head_name),
                                    outputs[-1], batch['label'], module=head)
    grads, g_weights = {head_name: g_head}, {k: None for k in state.alphas}
    g_states = [None] * (len(outputs) - 1) + [g_out]  # the stem, then each cell's output
    while pullbacks:
      name, pullback = pullbacks.pop()
      if name.endswith('/nodes') and self.cfg.programs == 'candidates':
        tape, pulls = pullback
        g_nodes, g_w = [None, None, *call(_split, g_states.pop(), n=NODES)], None
        for (c_name, node, j), pull in zip(reversed(tape), reversed(pulls)):
          grads[c_name], (g_x, g_w_c, _) = call(_pull, pull, g_nodes[2 + node])
          g_nodes[j], g_w = add(g_nodes[j], g_x), add(g_w, g_w_c)
        g0, g1 = g_nodes[:2]
        kind = _kind(dict(self.pieces)[name])
        g_weights[kind] = add(g_weights[kind], g_w)
      elif name.endswith('/nodes'):
        grads[name], (g0, g1, g_w) = call(_pull, pullback, g_states.pop())
        kind = _kind(dict(self.pieces)[name])
        g_weights[kind] = add(g_weights[kind], g_w)
      elif name.endswith('/pre'):
        grads[name], (g_s0, g_s1) = call(_pull, pullback, (g0, g1))
        g_states[-1] = add(g_states[-1], g_s1)
        g_states[max(len(g_states) - 2, 0)] = add(g_states[max(len(g_states) - 2, 0)], g_s0)
      else:
        grads[name], _ = call(_pull, pullback, g_states.pop())
    new_state = call(_finish, state, supernet.merge(grads), g_weights,
                     supernet.merge(new_stats), update_alphas, lr, net=self.net, cfg=self.cfg)
    return new_state, metrics


PROGRAMS = ('pieces', 'candidates', 'whole')
_COMPILED = {}


def _args():
  """``update_alphas, lr, skip_drop, key`` of the updates that compile or analyse the step."""
  return np.bool_(True), np.float32(0), np.float32(0), jax.random.key(0)


def compile_update_step(state, batch, *, net, cfg):
  """The update for these shapes and shardings, compiled ahead of time, and the seconds it took
  (0 when an earlier stage or run in this process compiled the same programs): ``update_step``
  compiled, or for the other layouts a ``PieceUpdate`` whose programs were compiled
  by one update of a zero copy of ``state``."""
  key = (net, cfg, jax.tree.structure(state),
         tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves((state, batch))))
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  if cfg.programs != 'whole':
    update = PieceUpdate(net, cfg)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), state)
    jax.block_until_ready(update(zeros, batch, *_args()))
  else:
    update = update_step.lower(state, batch, *_args(), net=net, cfg=cfg).compile()
  _COMPILED[key] = update
  return update, time.perf_counter() - t0


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _walk(state, batch, net, cfg):
  """The ``PieceUpdate`` chain for these shapes, walked with abstract arrays: each distinct
  program lowered once (``{key: Lowered}``) and the key of every call in order, with whether it
  is a piece's forward pass. (Compiling these does not fill jit's cache for the real calls.)"""
  lowered, calls = {}, []

  def call(program, *args, **static):
    key = (program, tuple(sorted(static.items())), jax.tree.structure(args),
           tuple((x.shape, x.dtype, getattr(x, 'sharding', None))
                 for x in jax.tree.leaves(args)))
    if key not in lowered:
      lowered[key] = program.lower(*args, **static)
    calls.append((key, program is _piece_forward))
    return lowered[key].out_info

  PieceUpdate(net, cfg)(*_abstract((state, batch)), *_args(), call=call)
  return lowered, calls


def update_memory(state, batch, *, net, cfg) -> int:
  """Bytes one update of these shapes needs on each device, from XLA's memory analysis of its
  compiled programs. One program: its arguments, outputs and temporaries. ``pieces``: the state
  and batch, every forward piece's outputs (each pullback lives until the backward pass reaches
  it) and the largest outputs plus temporaries of one program. ``state`` and ``batch`` may be
  abstract (``jax.ShapeDtypeStruct`` with shardings)."""
  if cfg.programs == 'whole':
    m = update_step.lower(*_abstract((state, batch)), *_args(), net=net,
                          cfg=cfg).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
  lowered, calls = _walk(state, batch, net, cfg)
  memory = {k: low.compile().memory_analysis() for k, low in lowered.items()}
  kept = sum(memory[k].output_size_in_bytes for k, forward in calls if forward)
  largest = max(m.output_size_in_bytes + m.temp_size_in_bytes for m in memory.values())
  return _device_bytes(_abstract((state, batch))) + kept + largest


def _device_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


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


def eval_step(state: SearchState, batch, *, net: supernet.Supernet, mean, std,
              programs: str = 'pieces'):
  """Summed loss, correct count and count of ``batch`` in eval mode, from the compiled programs
  of ``programs`` (one per supernet piece, per candidate, or one for the whole supernet)."""
  if programs == 'whole':
    return _eval_whole(state, batch, net=net, mean=mean, std=std)
  images = _normalize(batch['image'], mean=mean, std=std)
  pieces = net.pieces()

  def apply(name, module, inputs, *_):
    return _piece_eval(supernet.select(state.params, name),
                       supernet.select(state.batch_stats, name), inputs, module=module)

  def forward(_, name, module, inputs):
    if programs == 'candidates' and name.endswith('/nodes'):
      return _candidate_chain(module, name.split('/')[0], *inputs, apply)[0]
    return apply(name, module, inputs)

  outputs = _forward_chain(pieces, images, _edge_weights(state.alphas, net=net), forward)
  return _eval_head(supernet.select(state.params, 'head'), outputs[-1], batch['label'],
                    module=pieces[-1][1])


@functools.partial(jax.jit, static_argnames=('net', 'mean', 'std'))
def _eval_whole(state: SearchState, batch, *, net, mean, std):
  logits = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                     data.normalize(batch['image'], mean, std),
                     supernet.edge_weights(state.alphas, _masks(net)), train=False)
  return _eval_sums(logits, batch['label'])


_normalize = jax.jit(data.normalize, static_argnames=('mean', 'std'))


@functools.partial(jax.jit, static_argnames='module')
def _piece_eval(params, stats, inputs, *, module):
  return module.apply({'params': params, 'batch_stats': stats}, *inputs, train=False)


@functools.partial(jax.jit, static_argnames='module')
def _eval_head(params, x, labels, *, module):
  return _eval_sums(module.apply({'params': params}, x), labels)


def _eval_sums(logits, labels):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'loss_sum': losses.sum(), 'correct': jnp.sum(jnp.argmax(logits, -1) == labels),
          'count': jnp.asarray(labels.shape[0])}


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
