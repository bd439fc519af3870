"""The piece engine: a network run as a chain of separately compiled pieces (``Piece``) over
named values, forward and in reverse, its weights updated piece by piece, and its programs
compiled in parallel (docs/design.md, "Program layouts").

XLA's compile time grows faster than the program, and equal pieces (the nodes of the cells of one
type and width, or one candidate on every edge and cell) share one compiled program. Each piece's
forward program also returns its ``jax.vjp`` pullback as a pytree, which ``pull`` runs in the
reverse pass. Every array operation runs inside a program, and each program runs through a
``call(program, *args, **static)`` hook, so a chain can also be walked with abstract arrays
(``autobatch``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from prnas_jax import ops, parallel
from prnas_jax.optim import momentum_buffer, sgd_part_update, with_momentum_buffer


@dataclasses.dataclass(frozen=True)
class Piece:
  """A separately compiled part of a network (docs/design.md, "Program layouts"): ``module``
  applied to the named values ``inputs`` (and ``index`` as a traced constant) writes the values
  ``outputs``; a value written by several pieces is their sum. Its variables are ``keys`` under
  ``scope`` in the network's trees (``select``); ``rate``: the keyword of the module's traced
  dropout rate (the search's skip dropout, the retraining's drop-path), if it takes one."""
  name: str
  module: nn.Module
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  scope: tuple[str, ...] = ()
  keys: tuple[str, ...] = ()
  index: tuple[int, ...] = ()
  rate: str = ''


def select(tree, piece: Piece) -> dict:
  """The part of a ``params`` or ``batch_stats`` tree that belongs to ``piece``."""
  for name in piece.scope:
    tree = tree.get(name, {})
  return {k: tree[k] for k in piece.keys if k in tree}


def merge(parts: Iterable[tuple[Piece, dict]]) -> dict:
  """The inverse of ``select``: one tree from the parts of every piece."""
  out = {}
  for piece, part in parts:
    if part:
      node = out
      for name in piece.scope:
        node = node.setdefault(name, {})
      node.update(part)
  return out


def call(program, *args, **static):
  """The default hook: runs ``program``."""
  return program(*args, **static)


def call_to_completion(program, *args, **static):
  """Runs ``program`` and waits for its results: the hook on a host with several CPU devices.
  XLA:CPU launches each device's part of a program from a thread pool, in no fixed order, and
  a device runs a bounded number of programs at a time; with the chain dispatched far ahead, a
  device's later programs could take every slot while its part of an earlier program, which
  they wait for, is still unlaunched (a deadlock that ends in a collective's 40 s rendezvous
  timeout)."""
  return jax.block_until_ready(program(*args, **static))


def default_hook():
  """``call``, or ``call_to_completion`` where this process has several CPU devices."""
  several_cpus = jax.default_backend() == 'cpu' and jax.local_device_count() > 1
  return call_to_completion if several_cpus else call


def constants(piece: Piece) -> tuple:
  """The traced constants ``piece.module`` takes after its inputs."""
  return (np.array(piece.index, np.int32),) if piece.index else ()


@functools.partial(jax.jit, static_argnames=('module', 'rate', 'remat'))
def forward_program(params, stats, inputs, consts, drop, key, index, kernel_grads, *,
                    module, rate: str, remat: bool):
  """``module`` in training mode on ``inputs``, given the dropout rate ``drop`` as its keyword
  argument ``rate`` unless that is empty (its dropout and drop-path key: ``key`` folded with the
  piece's ``index``): its output, new BatchNorm statistics and the pullback from the output's
  gradient
  to those of ``params`` and ``inputs``, the convolutions' kernel gradients zero where the
  boolean ``kernel_grads`` is false (None: always computed; ``ops.kernel_grads``). With
  ``remat`` the pullback keeps only the inputs and recomputes the forward pass (on the CPU
  less memory and a faster step: XLA fuses the recomputation into the backward pass instead of
  reading stored intermediates)."""
  extra = {rate: drop} if rate else {}
  piece_key = jax.random.fold_in(key, index)

  def fn(params, inputs):
    with ops.kernel_grads(kernel_grads):
      out, new = module.apply({'params': params, 'batch_stats': stats}, *inputs, *consts,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': piece_key, 'drop_path': piece_key}, **extra)
    return out, new['batch_stats']

  out, pullback, new_stats = jax.vjp(jax.checkpoint(fn) if remat else fn, params, inputs,
                                     has_aux=True)
  return out, new_stats, pullback


@functools.partial(jax.jit, static_argnames='module')
def eval_program(params, stats, inputs, consts, *, module):
  """``module`` in eval mode on ``inputs``."""
  return module.apply({'params': params, 'batch_stats': stats}, *inputs, *consts, train=False)


def with_squared_norm(grads):
  """``grads`` and their squared norm, their share of the clip's global norm (``sgd``), computed
  inside the program that makes them (one program less per piece and step)."""
  return grads, optax.tree.norm(grads, squared=True)


@jax.jit
def pull(pullback, g):
  """A piece's pullback on the gradients ``g`` of its outputs: those of its variables with their
  squared norm (``with_squared_norm``), and those of its inputs."""
  g_vars, g_in = pullback(g)
  return with_squared_norm(g_vars), g_in


@jax.jit
def pull_inputs(pullback, g):
  """``pull`` without the variables' gradients (None), whose work XLA then drops: the
  backward pass of an alpha update."""
  return None, pullback(g)[1]


@jax.jit
def add(*trees):
  """The sum of ``trees``, added left to right (as one add after another would)."""
  return jax.tree.map(lambda *xs: functools.reduce(jnp.add, xs), *trees)


def _total(parts: dict, name: str, hook):
  """The value ``name`` of ``parts`` (name -> the terms written so far), its terms summed by
  one program if there are several."""
  terms = parts[name]
  if len(terms) > 1:
    parts[name] = terms = [hook(add, *terms)]
  return terms[0]


def forward(pieces: list[Piece], values: dict, apply, hook=call, keep=()) -> dict:
  """Runs ``pieces`` in order. ``values`` maps names to the chain's inputs; each piece reads its
  ``inputs`` from it and adds its ``outputs`` to it (a value several pieces write is their sum in
  piece order, taken by one program at its first read). ``apply(i, piece, inputs)`` runs piece
  ``i`` and returns its output, a tuple if it has several. A value is dropped after its last
  reader unless ``keep`` names it; returns the rest."""
  last_read = {name: i for i, piece in enumerate(pieces) for name in piece.inputs
               if name not in keep}
  parts = {name: [v] for name, v in values.items()}
  for i, piece in enumerate(pieces):
    out = apply(i, piece, tuple(_total(parts, name, hook) for name in piece.inputs))
    for name, y in zip(piece.outputs, out if len(piece.outputs) > 1 else (out,)):
      parts.setdefault(name, []).append(y)
    for name in set(piece.inputs):
      if last_read.get(name) == i:
        del parts[name]
  return {name: _total(parts, name, hook) for name in list(parts)}


def backward(pieces: list[Piece], pullbacks: list, grads: dict, hook=call, variables=True,
             weightless=frozenset()):
  """The reverse of ``forward``: ``pullbacks[i]`` maps the gradients of piece ``i``'s outputs to
  those of its variables and inputs; ``grads`` holds the gradients of the chain's outputs.
  Returns ``{piece name: (variable gradients, their squared norm)}`` (None without
  ``variables``) and ``grads`` with the gradients of the chain's inputs (summed over their
  readers, by one program where a value has several). Without ``variables`` the pieces
  ``weightless`` (indices of pieces without parameters) still run ``pull``: for them it is the
  same program as ``pull_inputs``, so one compile serves both kinds of update."""
  first_writer = {}
  for i, piece in enumerate(pieces):
    for name in piece.outputs:
      first_writer.setdefault(name, i)
  parts = {name: [g] for name, g in grads.items()}
  g_vars = {}
  for i in reversed(range(len(pieces))):
    piece = pieces[i]
    g_out = tuple(_total(parts, name, hook) for name in piece.outputs)
    program = pull if variables or i in weightless else pull_inputs
    g_vars[piece.name], g_in = hook(program, pullbacks[i], g_out if len(g_out) > 1 else g_out[0])
    for name in piece.outputs:
      if first_writer[name] == i:  # every writer of the value has its gradient now
        del parts[name]
    for name, g in reversed(list(zip(piece.inputs, g_in))):  # the last input first: the
      parts.setdefault(name, []).append(g)  # order the forward sums were made in
  return g_vars, {name: _total(parts, name, hook) for name in list(parts)}


class Lowering:
  """A ``call`` hook for a chain walked with abstract arrays (``abstract``): runs no program,
  lowers each distinct one once (``lowered``, in order), records the key of every call in order
  with whether it is a piece's forward pass (``calls``) and returns the program's abstract
  outputs. With ``sharding`` (one device's), the outputs of a program with a committed input are
  committed to it, as the real calls' are, so that what compiles from ``lowered`` serves them."""

  def __init__(self, sharding=None, on_lowered=lambda lowered: None):
    self.sharding, self.on_lowered = sharding, on_lowered
    self.lowered, self.calls = {}, []

  def __call__(self, program, *args, **static):
    leaves = jax.tree.leaves(args)
    key = (program, tuple(sorted(static.items())), jax.tree.structure(args),
           tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in leaves))
    if key not in self.lowered:
      self.lowered[key] = program.trace(*args, **static).lower()
      self.on_lowered(self.lowered[key])
    self.calls.append((key, program is forward_program))
    out = self.lowered[key].out_info
    if self.sharding is None or all(getattr(x, 'sharding', None) is None for x in leaves):
      return out
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding),
                        out)


def abstract(tree):
  """``tree`` as ``jax.ShapeDtypeStruct``s, committed arrays with their sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype,
      sharding=getattr(x, 'sharding', None) if getattr(x, 'committed', True) else None), tree)


@jax.jit
def _root_of_sum(squares):
  return jnp.sqrt(jnp.sum(jnp.stack(squares)))


@functools.partial(jax.jit, static_argnames='cfg', donate_argnames=('params', 'trace'))
def _piece_sgd(params, trace, grads, norm, lr, *, cfg):
  """``optim.sgd_tx``'s step (``cfg.clip``, ``cfg.weight_decay``, ``cfg.momentum``) on one
  piece's weights and their momentum buffer ``trace``; ``norm`` is the global norm of all the
  gradients (the clip's)."""
  updates, trace = sgd_part_update(params, trace, grads, norm, clip=cfg.clip,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum)
  return jax.tree.map(lambda p, u: p - lr * u, params, updates), trace


def sgd(params, opt_state, parts, lr, call, cfg):
  """The weights and their ``optim.sgd_tx`` state after a step from ``parts``, (piece, (its
  weights' gradients, their squared norm)) for every piece with weights: one program per piece,
  shared by the pieces of one structure (one program for all the weights took 25 s of the
  8-cell ``mid`` supernet's compile), after one for the global norm that the clip takes.
  ``cfg`` holds the clip, weight decay and momentum."""
  norm = call(_root_of_sum, [squared for _, (_, squared) in parts])
  buffer = momentum_buffer(opt_state)
  new = [(piece, call(_piece_sgd, select(params, piece), select(buffer, piece), g, norm, lr,
                      cfg=cfg)) for piece, (g, _) in parts]
  return (merge((p, w) for p, (w, _) in new),
          with_momentum_buffer(opt_state, merge((p, t) for p, (_, t) in new)))


def compile_in_parallel(walk, *args) -> None:
  """Compiles the programs that ``walk(hook, *args)`` calls through ``hook`` in a thread pool
  (one thread more than the cores), while this thread walks with abstract arrays, tracing and
  lowering each distinct program (``Lowering``); the jitted calls then find them compiled. Only
  where ``args`` are committed to the one device, as the runs place them (arrays, or abstract
  arrays with that sharding): the outputs' sharding
  is then known before compiling (on several devices it is XLA's choice), and uncommitted
  arrays lower differently from the walk's (everything would compile twice). Elsewhere the
  programs compile one by one at their first call."""
  if jax.device_count() > 1 or not all(
      getattr(x, 'committed', getattr(x, 'sharding', None) is not None)
      for x in jax.tree.leaves(args)):
    return
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0)) + 1) as pool:
    jobs = []
    walk(Lowering(parallel.replicated(), lambda lowered: jobs.append(pool.submit(
        lowered.compile))), *abstract(args))
    for job in jobs:
      job.result()
