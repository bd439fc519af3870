"""The search step (first-order DARTS, reference §6): one update of the alphas or the weights,
as one compiled program (``update_step``) or as a chain of piece programs (``PieceUpdate``,
docs/design.md, "Program layouts"); the evaluation on the alpha split.

One search step = an alpha update on an alpha-split batch (skipped in the grace epochs), then a
weight update on a weight-split batch with the updated alphas; both run the same compiled
update. Batches arrive as uint8 images and are augmented inside jit.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prnas_jax import data, ops, parallel, pieces, supernet
from prnas_jax.optim import cross_entropy, sgd_tx
from prnas_jax.pieces import merge, select


@flax.struct.dataclass
class SearchState:
  params: Any
  batch_stats: Any
  alphas: Any
  w_opt: optax.OptState
  a_opt: optax.OptState


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
  programs: str = 'pieces'  # 'pieces', 'edges', 'candidates': PieceUpdate; 'whole': update_step
  full_alpha_pullback: bool = False  # PieceUpdate's alpha half runs the weight half's pullbacks

  @classmethod
  def from_config(cls, search, stage: int, mean, std, net: supernet.Supernet | None = None,
                  alpha_steps: int | None = None) -> StepConfig:
    """The step of stage ``stage`` of the search config ``search`` (``config.search``), for
    data normalised by ``mean`` and ``std``; ``search.alpha_pullback='auto'`` looks at the
    stage's supernet ``net`` and its number of alpha updates (``alpha_pullback``)."""
    programs = program_layout(search.programs)
    return cls(mean=tuple(mean), std=tuple(std), momentum=search.momentum,
               weight_decay=search.weight_decay, clip=search.clip, alpha_lr=search.alpha_lr,
               alpha_b1=search.alpha_b1, alpha_b2=search.alpha_b2,
               alpha_weight_decay=search.alpha_weight_decay, alpha_clip=search.alpha_clip,
               cutout=search.cutout, skip_dropout=search.stages.skip_dropout[stage] > 0,
               programs=programs, full_alpha_pullback=alpha_pullback(
                   search.alpha_pullback, programs, net, alpha_steps) == 'full')

  def weight_tx(self) -> optax.GradientTransformation:
    return sgd_tx(self.clip, self.weight_decay, self.momentum)

  def alpha_tx(self) -> optax.GradientTransformation:
    """Clip, coupled L2, Adam."""
    return optax.chain(optax.clip_by_global_norm(self.alpha_clip),
                       optax.add_decayed_weights(self.alpha_weight_decay),
                       optax.adam(self.alpha_lr, b1=self.alpha_b1, b2=self.alpha_b2, eps=1e-8))


def program_layout(programs: str) -> str:
  """The layout ``programs`` names; ``'auto'``: ``'edges'`` on a CPU (there it compiled as fast
  as ``'candidates'`` or faster and stepped as fast as ``'pieces'`` or faster), else
  ``'pieces'`` (docs/design.md, "Program layouts")."""
  if programs != 'auto':
    return programs
  return 'edges' if jax.default_backend() == 'cpu' else 'pieces'


# 'auto' takes 'full' on a CPU below this many alpha updates per distinct piece program.
FULL_PULLBACK_BELOW = 30


def alpha_pullback(setting: str, programs: str, net: supernet.Supernet | None = None,
                   alpha_steps: int | None = None) -> str:
  """The pullbacks of a ``PieceUpdate``'s alpha half: ``'inputs'`` (programs that leave out the
  weights' gradients, compiled a second time for every piece with weights) or ``'full'`` (the
  weight half's programs, their kernel gradients switched off at run time:
  ``ops.kernel_grads``). ``'auto'``: ``'full'`` on a CPU when the stage has fewer than
  ``FULL_PULLBACK_BELOW`` alpha updates (``alpha_steps``) per distinct piece program of ``net``,
  where the compile it saves outweighs alpha updates 3-4 % slower (docs/design.md, "Program
  layouts"), else ``'inputs'``."""
  if setting != 'auto':
    return setting
  if programs == 'whole' or net is None or alpha_steps is None or jax.default_backend() != 'cpu':
    return 'inputs'
  distinct = len({piece.module for piece in net.pieces(programs)[:-1]})
  return 'full' if alpha_steps < FULL_PULLBACK_BELOW * distinct else 'inputs'


def create_state(variables, alphas, cfg: StepConfig) -> SearchState:
  return SearchState(variables['params'], variables['batch_stats'], alphas,
                     cfg.weight_tx().init(variables['params']), cfg.alpha_tx().init(alphas))


def _masks(net):
  return {k: jnp.asarray(m) for k, m in supernet.alpha_masks(net.edge_ops()).items()}


def _where(flag, a, b):
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames='state')
def update_step(state: SearchState, batch, update_alphas, lr, skip_drop, key, *,
                net: supernet.Supernet, cfg: StepConfig):
  """One forward/backward pass on ``batch`` that updates either the alphas (Adam) or the
  weights (SGD with learning rate ``lr``); BatchNorm statistics are updated either way.

  Both gradients come from the same pass, so one compiled program serves the alpha and the
  weight half of a search step (about half the compile time of two programs; the alpha half
  also computes the unused weight gradients, as the reference does, where ``PieceUpdate``
  skips them; on a CPU it skips the convolutions' kernel gradients, ``ops.kernel_grads``).
  ``state`` is donated.
  """
  images, k_drop = _augment(key, batch['image'], cfg)
  masks = _masks(net)

  def loss_fn(params, alphas):
    with ops.kernel_grads(_kernel_grads_flag(jnp.logical_not(update_alphas))):
      logits, new = net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                              supernet.edge_weights(alphas, masks), train=True,
                              skip_drop=skip_drop if cfg.skip_dropout else None,
                              mutable=['batch_stats'], rngs={'dropout': k_drop})
    return cross_entropy(logits, batch['label']), (new['batch_stats'], logits)

  (loss, (stats, logits)), (g_params, g_alphas) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.alphas)
  new_state = _apply_gradients(state, g_params, g_alphas, stats, update_alphas, lr, masks, cfg)
  return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def _kernel_grads_flag(weight_update):
  """The flag of ``ops.kernel_grads`` for an update: ``weight_update`` on a CPU, else None (the
  kernel gradients always computed: on a GPU a conditional copies its predicate to the host)."""
  return weight_update if jax.default_backend() == 'cpu' else None


def _apply_gradients(state, g_params, g_alphas, stats, update_alphas, lr, masks, cfg):
  """Adam on the alphas or SGD on the weights, as ``update_alphas`` says; new statistics."""
  alphas, a_opt = _alpha_update(state.alphas, state.a_opt, g_alphas, masks, cfg)
  params, w_opt = _weight_update(state, g_params, lr, cfg)
  return SearchState(
      params=_where(update_alphas, state.params, params), batch_stats=stats,
      alphas=_where(update_alphas, alphas, state.alphas),
      w_opt=_where(update_alphas, state.w_opt, w_opt),
      a_opt=_where(update_alphas, a_opt, state.a_opt))


def _alpha_update(alphas, a_opt, g_alphas, masks, cfg):
  """The alphas and their optimizer state after an Adam step on the masked gradients."""
  g_alphas = jax.tree.map(lambda g, m: g * m, g_alphas, masks)
  updates, a_opt = cfg.alpha_tx().update(g_alphas, a_opt, alphas)
  return optax.apply_updates(alphas, updates), a_opt


def _weight_update(state, g_params, lr, cfg):
  """The weights and their optimizer state after an SGD step with learning rate ``lr``."""
  updates, w_opt = cfg.weight_tx().update(g_params, state.w_opt, state.params)
  return jax.tree.map(lambda p, u: p - lr * u, state.params, updates), w_opt


def _augment(key, image, cfg: StepConfig):
  """The augmented, normalised images of one update and its dropout key."""
  k_aug, k_drop = jax.random.split(key)
  return data.augment(k_aug, image, cfg.mean, cfg.std, crop_pad=cfg.crop_pad,
                      cutout=cfg.cutout), k_drop


_prepare = jax.jit(_augment, static_argnames='cfg')


@functools.partial(jax.jit, static_argnames='net')
def _edge_weights(alphas, *, net):
  return supernet.edge_weights(alphas, _masks(net))


@functools.partial(jax.jit, static_argnames='module')
def _head_loss(params, x, labels, *, module):
  def fn(params, x):
    logits = module.apply({'params': params}, x)
    return cross_entropy(logits, labels), logits
  (loss, logits), (g_params, g_x) = jax.value_and_grad(
      fn, argnums=(0, 1), has_aux=True)(params, x)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  return metrics, (pieces.with_squared_norm(g_params), g_x)


@functools.partial(jax.jit, static_argnames=('net', 'cfg'), donate_argnames=('alphas', 'a_opt'))
def _adam_alphas(alphas, a_opt, g_weights, *, net, cfg):
  """Adam on the alphas from ``g_weights``, the gradients of the edge weights (of a cell type
  without cells: None, zero): the new alphas and their optimizer state."""
  masks = _masks(net)
  g_weights = {k: jnp.zeros_like(a) if g_weights[k] is None else g_weights[k]
               for k, a in alphas.items()}
  _, pullback = jax.vjp(lambda a: supernet.edge_weights(a, masks), alphas)
  return _alpha_update(alphas, a_opt, pullback(g_weights)[0], masks, cfg)


class PieceUpdate:
  """``update_step`` (same arguments and results, within float tolerance) as a chain of
  compiled programs: augmentation, the supernet's pieces (``Supernet.pieces``: one per stem,
  cell preprocessing, cell nodes, or with ``cfg.programs`` ``'edges'`` or ``'candidates'`` one
  per edge or candidate, shared by every edge and cell with its candidates, stride and width),
  the head with the loss, the pieces' pullbacks in reverse, then the optimizer: Adam on the
  alphas in one program, or SGD on the weights in one program per piece (the updated arrays
  donated). ``update_alphas`` must be concrete: an alpha update's pullbacks skip the weights'
  gradients, a weight update's optimizer the alphas' (each pullback compiles once for each
  kind)."""

  def __init__(self, net: supernet.Supernet, cfg: StepConfig):
    self.net, self.cfg = net, cfg
    *self.body, self.head = net.pieces(cfg.programs)

  def __call__(self, state, batch, update_alphas, lr, skip_drop, key, call=None):
    """``call(program, *args, **static)`` runs each program (default: ``pieces.default_hook``)."""
    call = call or pieces.default_hook()
    alphas = bool(update_alphas)
    images, k_drop = call(_prepare, key, batch['image'], cfg=self.cfg)
    new_stats, pullbacks, weightless = [], [], set()

    def apply(i, piece, inputs):
      params = select(state.params, piece)
      if not params:
        weightless.add(i)
      out, stats, pullback = call(
          pieces.forward_program, params, select(state.batch_stats, piece),
          inputs, pieces.constants(piece), skip_drop, k_drop, np.int32(i),
          _kernel_grads_flag(np.bool_(not alphas)) if self.cfg.full_alpha_pullback else None,
          module=piece.module, rate=piece.rate if self.cfg.skip_dropout else '',
          remat=self.net.remat)
      new_stats.append((piece, stats))
      pullbacks.append(pullback)
      return out

    weights = call(_edge_weights, state.alphas, net=self.net)
    values = pieces.forward(self.body, supernet.chain_inputs(images, weights), apply, call)
    (features,) = self.head.inputs
    metrics, (g_head, g_features) = call(_head_loss, select(state.params, self.head),
                                         values[features], batch['label'],
                                         module=self.head.module)
    grads, g_inputs = pieces.backward(self.body, pullbacks, {features: g_features}, call,
                                      variables=not alphas or self.cfg.full_alpha_pullback,
                                      weightless=weightless)
    if alphas:
      g_weights = {k: g_inputs.get(supernet.weights_value(k)) for k in state.alphas}
      new_alphas, a_opt = call(_adam_alphas, state.alphas, state.a_opt, g_weights,
                               net=self.net, cfg=self.cfg)
      return state.replace(batch_stats=merge(new_stats), alphas=new_alphas, a_opt=a_opt), metrics
    by_name = {p.name: p for p in self.body}
    parts = [(p, g) for p, g in [(self.head, g_head)] + [(by_name[n], g) for n, g in grads.items()]
             if jax.tree.leaves(g[0])]
    params, w_opt = pieces.sgd(state.params, state.w_opt, parts, lr, call, self.cfg)
    return state.replace(params=params, batch_stats=merge(new_stats), w_opt=w_opt), metrics


def precompile(state, batch, net, cfg) -> None:
  """Compiles the programs of an alpha and a weight update of a ``PieceUpdate`` in parallel
  (``pieces.compile_in_parallel``)."""
  def walk(hook, state, batch):
    update = PieceUpdate(net, cfg)
    for update_alphas in (True, False):
      update(state, batch, *probe_args(update_alphas), call=hook)
  pieces.compile_in_parallel(walk, state, batch)


_COMPILED = {}
_EVALUATIONS = set()


def probe_args(update_alphas: bool = True):
  """``update_alphas, lr, skip_drop, key`` of the updates that compile or analyse the step."""
  return np.bool_(update_alphas), np.float32(0), np.float32(0), jax.random.key(0)


def _compile_key(state, batch, net, cfg):
  return (net, cfg, jax.tree.structure(state),
          tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves((state, batch))))


def _eval_key(state, batch, net, cfg):
  return _compile_key(state, batch, net, (cfg.programs, cfg.mean, cfg.std))


def compile_update_step(state, batch, *, net, cfg):
  """The update for these shapes and shardings, compiled ahead of time, and the seconds it took
  (0 when an earlier stage or run in this process compiled the same programs): ``update_step``
  compiled, or for the other layouts a ``PieceUpdate`` whose programs were compiled in
  parallel (``precompile``). In the whole layout the evaluation's one program compiles too, in
  a thread while this one traces and compiles the update; the other layouts compile theirs at
  the first evaluation (``compile_eval_step``). Where first runs cost
  (``parallel.first_runs_cost``: the H200 spent 41 s in one) an alpha and a weight update of a
  zero copy of ``state`` (and the whole layout's evaluation) take them before the first step."""
  key = _compile_key(state, batch, net, cfg)
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  if cfg.programs != 'whole':
    precompile(state, batch, net, cfg)
    update = PieceUpdate(net, cfg)
  else:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      evaluation = pool.submit(_eval_whole.lower(state, batch, net=net, mean=cfg.mean,
                                                 std=cfg.std).compile)
      update = update_step.lower(state, batch, *probe_args(), net=net, cfg=cfg).compile()
      evaluation.result()
    _EVALUATIONS.add(_eval_key(state, batch, net, cfg))
  if parallel.first_runs_cost():
    zeros = parallel.zeros_like(state)
    for update_alphas in (True, False):
      zeros, _ = update(zeros, batch, *probe_args(update_alphas))
    jax.block_until_ready(zeros)
    if cfg.programs == 'whole':
      jax.block_until_ready(eval_step(state, batch, net=net, mean=cfg.mean, std=cfg.std,
                                      programs=cfg.programs))
  _COMPILED[key] = update
  return update, time.perf_counter() - t0


def compile_eval_step(state, batch, *, net, cfg) -> float:
  """Compiles the programs of ``eval_step`` on batches like ``batch`` in parallel
  (``pieces.compile_in_parallel``), unless they were (the whole layout's compiled with the
  update), and returns the seconds it took. The search calls it at its first evaluation, at the
  end of a stage, so that these programs do not delay the first step (docs/design.md)."""
  key = _eval_key(state, batch, net, cfg)
  if key in _EVALUATIONS:
    return 0.0
  t0 = time.perf_counter()
  pieces.compile_in_parallel(
      lambda hook, state, batch: eval_step(state, batch, net=net, mean=cfg.mean, std=cfg.std,
                                           programs=cfg.programs, call=hook), state, batch)
  _EVALUATIONS.add(key)
  return time.perf_counter() - t0


def release_programs() -> None:
  """Frees every compiled program (``compile_update_step``'s and jit's caches), as a stage ends:
  the next stage's supernet needs its own, and the persistent cache holds any it shares. Each
  XLA:CPU executable holds memory mappings (a convolution's gradient about 100), of which a
  process may hold 65,530 (Linux's ``vm.max_map_count``); mmap then fails inside XLA (a
  segmentation fault). The small search's three stages held 3,200, 8,700 and 20,600 without
  this; the nine stages of a search at 8 cells would have held more."""
  _COMPILED.clear()
  _EVALUATIONS.clear()
  jax.clear_caches()


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
              programs: str = 'pieces', call=None):
  """Summed loss, correct count and count of ``batch`` in eval mode, from the compiled programs
  of ``programs`` (one per supernet piece, per edge, per candidate, or one for the whole
  supernet); ``call`` as in ``PieceUpdate``."""
  call = call or pieces.default_hook()
  if programs == 'whole':
    return call(_eval_whole, state, batch, net=net, mean=mean, std=std)
  *body, head = net.pieces(programs)

  def apply(_, piece, inputs):
    return call(pieces.eval_program, select(state.params, piece),
                select(state.batch_stats, piece), inputs, pieces.constants(piece),
                module=piece.module)

  weights = call(_edge_weights, state.alphas, net=net)
  values = pieces.forward(body, supernet.chain_inputs(
      call(_normalize, batch['image'], mean=mean, std=std), weights), apply, call)
  return call(_eval_head, select(state.params, head), values[head.inputs[0]], batch['label'],
              module=head.module)


@functools.partial(jax.jit, static_argnames=('net', 'mean', 'std'))
def _eval_whole(state: SearchState, batch, *, net, mean, std):
  logits = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                     data.normalize(batch['image'], mean, std),
                     supernet.edge_weights(state.alphas, _masks(net)), train=False)
  return _eval_sums(logits, batch['label'])


_normalize = jax.jit(data.normalize, static_argnames=('mean', 'std'))


@functools.partial(jax.jit, static_argnames='module')
def _eval_head(params, x, labels, *, module):
  return _eval_sums(module.apply({'params': params}, x), labels)


def _eval_sums(logits, labels):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'loss_sum': losses.sum(), 'correct': jnp.sum(jnp.argmax(logits, -1) == labels),
          'count': jnp.asarray(labels.shape[0])}
