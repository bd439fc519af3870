"""``python -m prnas_jax.search --config configs/dl2.py --workdir runs/dl2``: the prune-and-replace
stage loop (reference §5).

Each stage builds the supernet of the current candidate pools, takes over the previous stage's
weights by name, initialises new candidates from their parents, trains with fresh alphas and
optimizers, then prunes every edge by softmax(alpha) and morphs survivors into new candidates.
The last stage derives the genotype. Everything a run writes lands in its workdir.

A checkpoint is written at every stage's start and after every epoch; rerunning the same command
resumes from the newest intact one and ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax import (autobatch, checkpoint, cli, data, genotype, loop, metrics, morph, ops,
                       optim, parallel, report, search_step, space, supernet)
from prnas_jax.config import STAGE_KEYS, validate
from prnas_jax.errors import UserError
from prnas_jax.files import write_json
from prnas_jax.metrics import log


@dataclasses.dataclass
class Splits:
  """This process's shard of the weight and alpha halves of the training split, on device."""
  weights: dict
  alphas: dict
  num_classes: int
  mean: tuple
  std: tuple

  @property
  def image_shape(self):
    return self.weights['image'].shape[1:]


def load_data(config) -> Splits:
  train = data.load_split(config.data, 'train')
  if config.data.max_train:
    train = data.subset(train, config.data.max_train, config.seed)
  mean, std = data.mean_std(config.data, train)
  halves = data.split_portion(train, config.data.train_portion)
  for name, half in zip(('weight', 'alpha'), halves):
    if len(half.labels) < config.search.batch_size:  # an automatic batch is capped instead
      raise UserError(f'search.batch_size {config.search.batch_size} is larger than the {name} '
                      f'split ({len(half.labels)} images): lower it or use more data')
  put = lambda s: jax.device_put(parallel.process_shard({'image': s.images, 'label': s.labels}))
  return Splits(put(halves[0]), put(halves[1]), train.num_classes,
                tuple(map(float, mean)), tuple(map(float, std)))


def checkpoint_step(epochs, stage: int, epoch: int) -> int:
  """The number of the checkpoint after ``epoch`` epochs of ``stage``: epochs completed in all
  stages plus the stage index, so that a stage's start (checkpoint ``epoch`` 0, its supernet
  built with the pruned and morphed space) follows the previous stage's last epoch."""
  return sum(epochs[:stage]) + epoch + stage


def _generator(state: dict) -> np.random.Generator:
  """A numpy Generator in the ``bit_generator.state`` recorded in a checkpoint."""
  rng = np.random.default_rng()
  rng.bit_generator.state = state
  return rng


def finished(config, workdir: Path) -> genotype.Genotype | None:
  """The genotype of the search of ``config`` that ran to its end in ``workdir``, else None."""
  path = workdir / 'genotype.json'
  if not path.exists():
    return None
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', config.search.checkpoints_kept)
  latest = checkpoints.latest()
  checkpoints.close()
  epochs = config.search.stages.epochs
  return genotype.load(path) if latest == checkpoint_step(epochs, len(epochs) - 1,
                                                          epochs[-1]) else None


class Search:
  """The stage loop of one search run. A checkpoint is written at every stage's start and after
  every epoch (see ``checkpoint_step``); a new ``Search`` in the same workdir continues from the
  newest one exactly as the uninterrupted run would."""

  def __init__(self, config, workdir: Path, splits: Splits):
    self.config, self.workdir, self.splits = config, workdir, splits
    self.batch_sizes = {}  # stage -> global batch size
    self.space = space.initial_space(config.search.start)
    self.key = jax.random.key(config.seed)
    self.morph_rng = np.random.default_rng([config.seed, 0])
    self.batch_rng = np.random.default_rng([config.seed, 1])
    self.epoch = 0  # global epoch counter (TensorBoard x axis)
    self.checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints',
                                              config.search.checkpoints_kept, cli.plain(config))

  def run(self) -> genotype.Genotype:
    epochs = self.config.search.stages.epochs
    first, e, net, state, timing = self.resume() or (0, 0, None, None, None)
    self.writer = metrics.Writer(self.workdir)
    self.progress = metrics.Progress(
        (sum(epochs) - self.epoch) * self.split_size * jax.process_count(), self.config.log_every)
    previous = None
    for i in range(first, len(epochs)):
      if state is None:
        net, state = self.build_stage(i, previous)
        e, timing = 0, {'compile_s': 0.0, 'train_s': 0.0}
        self.save(i, e, state, timing)
      state = self.train_stage(i, net, state, e, timing)
      previous = (net, {'params': state.params, 'batch_stats': state.batch_stats})
      geno = self.end_stage(i, net, state)
      state = None
      search_step.release_programs()
    self.log_space(len(epochs))
    if parallel.is_main_process():  # every process holds the same genotype
      if (darts := geno.to_darts()) is not None:
        write_json(self.workdir / 'genotype_darts.json', darts)
      genotype.save(geno, self.workdir / 'genotype.json')  # last: it marks the search finished
    log.info(f'genotype: {genotype.dumps(geno)}')
    self.writer.close()
    self.checkpoints.close()
    if parallel.is_main_process():
      log.info(f'pictures: {", ".join(p.name for p in report.draw_run(self.workdir))}')
    return geno

  @property
  def split_size(self) -> int:
    """Examples of the smaller split in this process: an epoch's worth."""
    return min(len(self.splits.weights['label']), len(self.splits.alphas['label']))

  def local_batch(self, i: int) -> int:
    return self.batch_sizes[i] // jax.process_count()

  def steps_per_epoch(self, i: int) -> int:
    return self.split_size // self.local_batch(i)

  def fit_batch(self, i: int, net, state) -> int:
    """Stage ``i``'s global batch: ``search.batch_size``, or if that is 0 the largest multiple
    of 8 (and of the device count) up to ``search.max_batch_size`` whose update fits
    ``search.memory_fraction`` of a device (``autobatch``)."""
    s = self.config.search
    if s.batch_size:
      return s.batch_size
    cap = min(s.max_batch_size, self.split_size * jax.process_count())
    b, limit = autobatch.search_batch(state, net, self.step_config(i), self.splits.image_shape,
                                      cap, s.memory_fraction)
    log.info(f'stage {i}: batch {b}, the largest up to {cap} within {limit / 2**30:.1f} GiB '
             f'({s.memory_fraction:.0%} of a device) by XLA\'s memory analysis')
    return b

  def supernet(self, i: int) -> supernet.Supernet:
    s, st = self.config.search, self.config.search.stages
    return supernet.build(self.space, layers=s.layers + st.add_layers[i],
                          channels=s.init_channels + st.add_width[i],
                          num_classes=self.splits.num_classes, dw_form=s.dw_form,
                          remat=s.remat, fuse_edges=s.fuse_edges)

  def step_config(self, i: int, net=None) -> search_step.StepConfig:
    """Stage ``i``'s step; with its supernet ``net`` (and batch) ``search.alpha_pullback='auto'``
    can weigh the stage's alpha updates against its programs."""
    st, alpha_steps = self.config.search.stages, None
    if net is not None:
      alpha_steps = (st.epochs[i] - st.grace_epochs[i]) * self.steps_per_epoch(i)
    return search_step.StepConfig.from_config(self.config.search, i, self.splits.mean,
                                              self.splits.std, net, alpha_steps)

  def new_state(self, i: int, net, variables, k_alpha) -> search_step.SearchState:
    """Stage ``i``'s state: ``variables``, fresh alphas and fresh optimizers."""
    alphas = supernet.init_alphas(k_alpha, supernet.alpha_masks(net.edge_ops()))
    return search_step.create_state(variables, alphas, self.step_config(i))

  def build_stage(self, i: int, previous):
    """The stage's supernet and its state: variables carried over by name when depth and width
    are unchanged (new candidates initialised from their parents), else fresh."""
    s = self.config.search
    net = self.supernet(i)
    self.key, k_init, k_morph = jax.random.split(self.key, 3)
    variables = supernet.init_variables(net, k_init, self.splits.image_shape)
    if previous is not None and (previous[0].layers, previous[0].channels) == (net.layers,
                                                                               net.channels):
      variables = supernet.carry_over(previous[1], variables)
      transfers = {kind: [(e, cell.candidates[p], cell.candidates[c])
                          for e, p, c in cell.transfers(s.reinit_morphed_every_stage)]
                   for kind, cell in self.space.items()}
      variables = supernet.init_from_parents(variables, net, transfers, k_morph)
    for cell in self.space.values():
      cell.clear_pending()
    self.log_space(i)
    self.writer.scalars(i, {f'stage/{k}': s.stages[k][i] for k in STAGE_KEYS} |
                        {'stage/layers': net.layers, 'stage/channels': net.channels})
    self.key, k_alpha = jax.random.split(self.key)
    state = parallel.replicate(self.new_state(i, net, variables, k_alpha))
    self.batch_sizes[i] = self.fit_batch(i, net, state)
    return net, state

  def save(self, i: int, e: int, state, timing: dict) -> None:
    """Checkpoint ``(i, e)``: the state and jax key as arrays; the space, numpy random states,
    scalars written so far and the stage's timing as the record."""
    record = {'stage': i, 'epoch': e, 'batch_size': self.batch_sizes[i],
              'scalars_lines': self.writer.lines,
              'space': {kind: cell.to_json() for kind, cell in self.space.items()},
              'morph_rng': self.morph_rng.bit_generator.state,
              'batch_rng': self.batch_rng.bit_generator.state, **timing}
    self.checkpoints.save(checkpoint_step(self.config.search.stages.epochs, i, e),
                          {'state': state, 'key': parallel.replicate(jax.random.key_data(self.key))},
                          record)

  def resume(self):
    """Restores the newest intact checkpoint, if any (space, random states, epoch counter;
    scalars.jsonl cut back to what was written then) and returns its ``(stage, epoch, net, state,
    timing)``."""
    found = self.checkpoints.restore_newest(self.template)
    if found is None:
      return None
    step, tree, record = found
    i, e = record['stage'], record['epoch']
    self.batch_sizes[i] = record['batch_size']
    self.morph_rng, self.batch_rng = _generator(record['morph_rng']), _generator(
        record['batch_rng'])
    self.epoch = sum(self.config.search.stages.epochs[:i]) + e
    self.key = jax.random.wrap_key_data(tree['key'])
    metrics.truncate_scalars(self.workdir, record['scalars_lines'])
    log.info(f'resuming from checkpoint {step} (stage {i}, epoch {e})')
    return i, e, self.supernet(i), parallel.replicate(tree['state']), {
        k: record[k] for k in ('compile_s', 'train_s')}

  def template(self, record: dict) -> dict:
    """The abstract state a checkpoint with ``record`` restores into; takes over its space."""
    self.space = {kind: space.CellSpace.from_json(obj) for kind, obj in record['space'].items()}
    i = record['stage']
    net = self.supernet(i)
    return jax.eval_shape(lambda k, v: {'state': self.new_state(i, net, v, k),
                                        'key': jax.random.key_data(k)},
                          self.key, supernet.variable_shapes(net, self.splits.image_shape))

  def train_stage(self, i: int, net, state, first: int, timing: dict):
    """Epochs ``first..`` of stage ``i``, a checkpoint after each; returns the trained state.
    ``timing`` (compile and training seconds of the stage) is updated."""
    s, st = self.config.search, self.config.search.stages
    epochs, grace, p_drop = st.epochs[i], st.grace_epochs[i], st.skip_dropout[i]
    local_batch = self.local_batch(i)
    spec = loop.Epochs(
        count=epochs, steps=self.steps_per_epoch(i), batch=self.batch_sizes[i],
        evaluation='valid', evaluate_from=epochs - s.valid_epochs,
        nan_fix=f'lower search.lr ({s.lr}) or search.alpha_lr ({s.alpha_lr}), or check the data',
        label=f'stage {i} ', scalar_offset=sum(st.epochs[:i]))
    batch = lambda split, idx: parallel.shard_batch({'image': split['image'][idx],
                                                     'label': split['label'][idx]})
    if first < epochs:
      cfg = self.step_config(i, net)
      widths = {k: [len(c) for c in net.edge_ops()[k]] for k in self.space}
      log.info(f'stage {i}: {net.layers} cells, C={net.channels}, candidates per edge '
               f'normal {widths["normal"]} reduce {widths["reduce"]}; compiling '
               f'({cfg.programs} programs, '
               f'{"full" if cfg.full_alpha_pullback else "inputs"} alpha pullbacks)')
      update, timing['compile_s'] = search_step.compile_update_step(
          state, batch(self.splits.weights, jnp.arange(local_batch)), net=net, cfg=cfg)
      log.info(f'stage {i}: compiled in {timing["compile_s"]:.1f} s')

    def begin(e):
      lr = optim.epoch_cosine(s.lr, s.lr_min, epochs, e)
      drop = p_drop * ((epochs - e - 1) / epochs if e < grace else np.exp(-0.2 * (e - grace)))
      w_idx, a_idx = (data.epoch_batches(self.batch_rng, len(split['label']), local_batch)
                      for split in (self.splits.weights, self.splits.alphas))

      def step(state, n):
        self.key, k = jax.random.split(self.key)
        return search_step.search_step(update, state, batch(self.splits.weights, w_idx[n]),
                                       batch(self.splits.alphas, a_idx[n]), e >= grace, lr,
                                       drop, k)
      return {'lr': lr, 'skip_dropout': drop}, step

    def save(done, state, result):
      timing['train_s'] += result['seconds']
      self.epoch += 1
      self.save(i, done, state, timing)

    state = loop.run(spec, state, first, begin=begin, evaluate=lambda state: self.evaluate(
        i, state, net), save=save, writer=self.writer, progress=self.progress)
    parallel.check_same(jax.device_get(state.alphas), f'the alphas of stage {i}')
    images_per_s = epochs * spec.steps * spec.batch / max(timing['train_s'], 1e-9)
    self.writer.scalars(i, {'stage/compile_s': timing['compile_s'],
                            'stage/images_per_s': images_per_s})
    log.info(f'stage {i}: {images_per_s:.1f} img/s, compile {timing["compile_s"]:.1f} s')
    return state

  def end_stage(self, i: int, net, state) -> genotype.Genotype | None:
    """Prunes and morphs by the trained alphas of stage ``i`` (recorded in stages/stage<i>.json);
    returns the genotype derived after the last stage."""
    probs = supernet.edge_probs(self.space, state.alphas, net)
    record = {'stage': i, 'layers': net.layers, 'channels': net.channels,
              'probs': {kind: [{str(self.space[kind].candidates[c]): p for c, p in e.items()}
                               for e in probs[kind]] for kind in self.space}}
    geno = None
    if i == len(self.config.search.stages.epochs) - 1:
      geno = space.derive(self.space, probs, self.config.search.max_skip_normal)
    record['events'] = space.prune_and_replace(self.space, probs, self.config.search, i,
                                               self.morph_rng)
    record['space'] = {kind: cell.to_json() for kind, cell in self.space.items()}
    write_json(self.workdir / 'stages' / f'stage{i}.json', record)
    self.log_events(i, record['events'])
    return geno

  def evaluate(self, i: int, state, net) -> dict:
    """Eval-mode loss and accuracy on the alpha split (whole batches of stage ``i``); the first
    evaluation of a stage compiles its programs (``search_step.compile_eval_step``)."""
    split, bs, cfg = self.splits.alphas, self.local_batch(i), self.step_config(i)
    batch = lambda start: parallel.shard_batch({k: v[start:start + bs] for k, v in split.items()})
    if seconds := search_step.compile_eval_step(state, batch(0), net=net, cfg=cfg):
      log.info(f'stage {i}: evaluation compiled in {seconds:.1f} s')
    return loop.mean_loss_accuracy(
        search_step.eval_step(state, batch(start), net=net, mean=cfg.mean, std=cfg.std,
                              programs=cfg.programs)
        for start in range(0, len(split['label']) - bs + 1, bs))

  def log_space(self, step: int) -> None:
    for kind, cell in self.space.items():
      self.writer.scalars(step, metrics.space_stats(f'switches_{kind}', cell))

  def log_events(self, i: int, events: dict) -> None:
    for kind, ev in events.items():
      probs = {}
      for c in ev['created']:
        probs.setdefault(c['edge'], []).append(c['parent_prob'])
      scalars = {f'switches_{kind}_morph_prob/p{e}': np.mean(p) for e, p in probs.items()}
      if probs:
        scalars[f'switches_{kind}_morph_prob/avg'] = np.mean([c['parent_prob']
                                                              for c in ev['created']])
      scalars[f'switches_{kind}/failed_morphs'] = ev['failed_morphs']
      self.writer.scalars(i, scalars)
      log.info(f'stage {i} {kind}: pruned {sum(map(len, ev["pruned"]))}, created '
               f'{len(ev["created"])}, failed morphs {ev["failed_morphs"]}')


OUTPUTS = ('checkpoints', 'scalars.jsonl', 'tb', 'stages', 'genotype.json', 'genotype_darts.json')


def check(config) -> None:
  """Raises a one-line UserError for the first problem of a search ``config``: its values, the
  names it looks up (start set, morph preset, depthwise form), and stages that keep more
  candidates than an edge holds."""
  validate(config)
  s = config.search
  morph.get_preset(s.preset)
  ops.check_dw_form(s.dw_form, 'search.dw_form')
  held = len(ops.start_set(s.start))
  for i, (keep, new) in enumerate(zip(s.stages.keep, s.stages.new)):
    if keep > held + new:
      raise UserError(f'search.stages.keep[{i}] = {keep} is more than an edge holds in stage '
                      f'{i} ({held} candidates + {new} new): use at most {held + new}')
    held = keep


def preflight(config, workdir, overwrite: bool) -> Path:
  """Every check that decodes no data (one image at most), first to last: the config, the
  workdir's path and the run it holds, the data source. Returns the workdir."""
  check(config)
  if config.search.batch_size:
    parallel.check_batch(config.search.batch_size, 'search.batch_size')
  workdir = cli.check_folder(workdir, '--workdir')
  cli.check_claim(workdir, config, overwrite)
  data.check_source(config.data, ('train',))
  return workdir


def run(config, workdir, overwrite: bool = False) -> genotype.Genotype:
  """Checks ``config`` and runs the search into ``workdir`` (refused if ``workdir`` holds a
  different run, unless ``overwrite``; nothing there is touched before the data is loaded)."""
  workdir = preflight(config, workdir, overwrite)
  cli.use_compile_cache(config.compile_cache)
  if not overwrite and (geno := finished(config, workdir)):
    cli.claim_workdir(workdir, config, overwrite, OUTPUTS)  # restores a lost config.json
    metrics.setup_logging(workdir)
    log.info(f'the search in {workdir} has finished: genotype: {genotype.dumps(geno)}')
    return geno
  splits = load_data(config)
  cli.claim_workdir(workdir, config, overwrite, OUTPUTS)
  metrics.setup_logging(workdir)
  log.info(f'search into {workdir} on {jax.default_backend()} (the config is in '
           f'{workdir / "config.json"})')
  return Search(config, workdir, splits).run()


def main() -> None:
  """``prnas-search`` and ``python -m prnas_jax.search``."""
  values = cli.run_flags('Search config file.', 'configs/tiny.py')
  cli.run(lambda: run(*values()))


if __name__ == '__main__':
  main()
