"""``python -m prnas_jax.train --config configs/train_cifar.py --config.genotype=DL2 --workdir W``:
retrains a genotype from scratch (reference §8) and reports the final and best test accuracy.

A checkpoint is written after every epoch; rerunning the same command resumes from the newest
intact one and ends exactly where an uninterrupted run would. ``--config.epochs=0`` only builds the
network and prints ``params: N`` (without the auxiliary head, as the papers count).
"""
from __future__ import annotations

import concurrent.futures
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax import (autobatch, checkpoint, cli, data, genotype, imagenet, initialize, loop,
                       metrics, network, ops, optim, parallel, train_step)
from prnas_jax.config import validate_train
from prnas_jax.errors import UserError
from prnas_jax.files import write_json
from prnas_jax.metrics import log


def learning_rate(config, epoch: int) -> float:
  """The learning rate of ``epoch`` (constant within an epoch, as in the reference)."""
  n = config.epochs
  if config.schedule == 'cosine':
    lr = optim.epoch_cosine(config.lr, config.lr_min, n, epoch)
  elif n - epoch > 5:  # 'linear': to a fifth of the way down over n-5 epochs, then a short tail
    lr = config.lr * (n - 5 - epoch) / (n - 5)
  else:
    lr = config.lr * (n - epoch) / ((n - 5) * 5)
  if epoch < config.warmup_epochs:
    lr *= (epoch + 1) / config.warmup_epochs
  return lr


def build_network(config, num_classes: int, image_shape) -> network.Network:
  """``config``'s network for images of ``image_shape``; a one-line UserError for a genotype op
  that spans more than the largest feature map (compiling it would take minutes) or weights
  whose training state cannot fit a device, or for scanned cells on a GPU."""
  m = config.model
  if m.scan_cells and jax.default_backend() == 'gpu':
    raise UserError('model.scan_cells=True failed on a GPU (the H200 with jax 0.11.2: a CUDA '
                    'launch failure in the first step; docs/design.md, "Scanned cells"): pass '
                    '--config.model.scan_cells=false or leave it unset')
  geno = genotype.load(config.genotype)
  genotype.check_fits(geno, max(image_shape[:2]) // (1 if m.stem == 'cifar' else 8),
                      config.genotype)
  net = network.Network(geno, layers=m.layers, channels=m.init_channels, num_classes=num_classes,
                        auxiliary=m.auxiliary, stem=m.stem, dw_form=m.dw_form or None,
                        remat=m.remat, scan_cells=m.scan_cells)
  shapes = network.variable_shapes(net, image_shape)['params']
  need = 3 * 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if need > autobatch.device_memory():  # float32 weights, gradients and momentum
    raise UserError(f'the network of {config.genotype} has '
                    f'{network.param_count(shapes) / 1e6:,.0f} million parameters; training '
                    f'them needs {need / 2**30:.0f} GiB, more than a device holds '
                    f'({autobatch.device_memory() / 2**30:.0f} GiB): use narrower convs (mul) '
                    'in the genotype or a smaller model.init_channels')
  return net


def initial_state(net: network.Network, cfg: train_step.TrainConfig, seed: int,
                  image_shape) -> train_step.TrainState:
  """A fresh state of ``net`` for images of ``image_shape`` (H, W, C)
  (``initialize.variables``)."""
  return train_step.create_train_state(initialize.variables(
      network.variable_shapes(net, image_shape), jax.random.key(seed)), cfg)


class InMemory:
  """A split held in memory (CIFAR, image folders): this process's shard of the training
  examples on its device, batches gathered by index."""

  def __init__(self, split: data.Split):
    self.split = split
    shard = parallel.process_shard({'image': split.images, 'label': split.labels})
    self.images, self.labels = jax.device_put(shard['image']), jax.device_put(shard['label'])
    self.num_classes, self.image_shape = split.num_classes, split.images.shape[1:]

  def __len__(self):
    return len(self.split)

  def epoch_batches(self, seed: int, epoch: int, batch: int):
    """This process's part (``batch`` rows) of each global batch of an epoch."""
    for idx in data.epoch_batches(np.random.default_rng([seed, epoch]), len(self.labels), batch):
      yield {'image': self.images[idx], 'label': self.labels[idx]}

  def eval_batches(self, batch: int):
    """All examples in order in global batches of ``batch``, the last padded with label -1 (one
    compiled shape); this process's rows of each."""
    yield from data.eval_batches(self.split.images, self.split.labels, batch)


class Training:
  """One retraining run in ``workdir``: data, network, state, and the epoch loop. ``train`` and
  ``test`` are ``InMemory`` splits or ``imagenet.Stream``s."""

  def __init__(self, config, workdir: Path, train, test, mean_std):
    self.config, self.workdir, self.train, self.test = config, workdir, train, test
    self.mean, self.std = (tuple(map(float, v)) for v in mean_std)
    self.local_batch = parallel.check_batch(config.batch_size, 'batch_size')
    self.net = build_network(config, train.num_classes, train.image_shape)
    self.cfg = train_step.TrainConfig.from_config(
        config, self.mean, self.std, 'imagenet' if isinstance(train, imagenet.Stream) else 'cifar')
    self.steps_per_epoch = len(train) // jax.process_count() // self.local_batch
    self.key = jax.random.key(config.seed)
    self.checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', config.checkpoints_kept,
                                              cli.plain(config))

  def initial_state(self) -> train_step.TrainState:
    return initial_state(self.net, self.cfg, self.config.seed, self.train.image_shape)

  def resume(self):
    """The newest intact checkpoint's state and record, or a fresh state and record."""
    found = self.checkpoints.restore_newest(lambda record: jax.eval_shape(
        lambda v: train_step.create_train_state(v, self.cfg),
        network.variable_shapes(self.net, self.train.image_shape)))
    if found is None:
      return parallel.replicate(self.initial_state()), {'epoch': 0, 'history': [],
                                                        'scalars_lines': 0}
    step, state, record = found
    metrics.truncate_scalars(self.workdir, record['scalars_lines'])
    log.info(f'resuming after epoch {record["epoch"]} from {self.checkpoints.directory / str(step)}')
    return parallel.replicate(state), record

  def run(self) -> dict:
    c = self.config
    state, record = self.resume()
    if record['epoch'] == c.epochs:
      self.checkpoints.close()
      return self.results(record)
    writer = metrics.Writer(self.workdir)
    progress = metrics.Progress(
        (c.epochs - record['epoch']) * self.steps_per_epoch * c.batch_size, c.log_every)
    step, seconds = train_step.compile_train_step(
        state, _abstract_batch(c.batch_size, self.train.image_shape), net=self.net, cfg=self.cfg)
    log.info(f'compiled the training step in {seconds:.1f} s')

    def begin(epoch):
      lr, drop = learning_rate(c, epoch), c.model.drop_path * epoch / c.epochs
      epoch_key = jax.random.fold_in(self.key, epoch)
      batches = self.train.epoch_batches(c.seed, epoch, self.local_batch)

      def step_fn(state, n):
        return step(state, parallel.shard_batch(next(batches)), np.float32(lr),
                    np.float32(drop), jax.random.fold_in(epoch_key, n))
      return {'lr': lr, 'drop_path_prob': drop}, step_fn

    def save(done, state, result):
      nonlocal record
      entry = {'epoch': result['epoch'], 'lr': result['lr'], 'drop_path': result['drop_path_prob'],
               'seconds': result['seconds'], 'images_per_s': result['images_per_s']} | {
                   f'{split}_{k}': result[split][k] for split in ('train', 'test')
                   for k in ('loss', 'accuracy')}
      record = {'epoch': done, 'history': record['history'] + [entry],
                'scalars_lines': writer.lines}
      self.checkpoints.save(done, state, record)
      write_json(self.workdir / 'results.json', self.results(record))

    spec = loop.Epochs(count=c.epochs, steps=self.steps_per_epoch, batch=c.batch_size,
                       evaluation='test', evaluate_from=0,
                       nan_fix='lower lr, or check the data; the last good checkpoint is kept')
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the test step compiles meanwhile
      self.test_program = pool.submit(train_step.test_step.lower(
          state, _abstract_batch(c.test_batch_size, self.test.image_shape), net=self.net,
          mean=self.mean, std=self.std).compile)
      loop.run(spec, state, record['epoch'], begin=begin, evaluate=self.evaluate, save=save,
               writer=writer, progress=progress)
    writer.close()
    self.checkpoints.close()
    return self.results(record)

  def results(self, record) -> dict:
    history = record['history']
    out = {'genotype': self.config.genotype, 'params': self.params,
           'epochs_done': record['epoch'], 'epochs': self.config.epochs,
           'finished': record['epoch'] == self.config.epochs, 'history': history}
    if history:
      best = max(history, key=lambda h: h['test_accuracy'])
      out |= {'final_test_accuracy': history[-1]['test_accuracy'],
              'final_test_error': 1 - history[-1]['test_accuracy'],
              'best_test_accuracy': best['test_accuracy'], 'best_epoch': best['epoch']}
    return out

  @functools.cached_property
  def params(self) -> int:
    return network.param_count(network.variable_shapes(self.net, self.train.image_shape)[
        'params'])

  def evaluate(self, state) -> dict:
    """Plain cross-entropy and accuracy on the whole test split, by the test step that ``run``
    compiles in a thread while the first epoch trains (no stall at the first evaluation)."""
    test_step = self.test_program.result()
    return loop.mean_loss_accuracy(test_step(state, parallel.shard_batch(batch))
                                   for batch in self.test.eval_batches(self.config.test_batch_size))


def _abstract_batch(batch: int, image_shape) -> dict:
  """A global batch of ``batch`` uint8 images of ``image_shape`` and labels, as abstract arrays
  placed as ``parallel.shard_batch`` places them."""
  shapes = {'image': ((batch, *image_shape), jnp.uint8), 'label': ((batch,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharded())
          for k, (shape, dtype) in shapes.items()}


def load_data(config):
  """The training and test inputs and the normalisation's mean and std."""
  if config.data.dataset == 'imagenet2012':
    size = config.image_size or 224
    train, test = (imagenet.Stream(config.data, split, size) for split in ('train', 'test'))
    return train, test, data.mean_std(config.data, None)
  train = data.load_split(config.data, 'train')
  if config.data.max_train:
    train = data.subset(train, config.data.max_train, config.seed)
  return InMemory(train), InMemory(data.load_split(config.data, 'test')), data.mean_std(
      config.data, train)


OUTPUTS = ('checkpoints', 'scalars.jsonl', 'tb', 'results.json')


def _check_config(config) -> None:
  """The checks of a retraining config that need no files."""
  validate_train(config)
  ops.check_dw_form(config.model.dw_form, 'model.dw_form')
  parallel.check_batch(config.batch_size, 'batch_size')
  parallel.check_batch(config.test_batch_size, 'test_batch_size')


def preflight(config, workdir, overwrite: bool) -> Path:
  """Every check that decodes no data (one image at most), first to last: the config, the
  workdir's path and the run it holds, the genotype, the data source, the network (sizes that
  fit). Returns the workdir."""
  _check_config(config)
  workdir = cli.check_folder(workdir, '--workdir')
  cli.check_claim(workdir, config, overwrite)
  genotype.load(config.genotype)
  if config.data.dataset == 'imagenet2012':
    _, classes = data.check_source(config.data, tuple(imagenet.SPLITS.values()))
    shape = (config.image_size or 224,) * 2 + (3,)
  else:
    shape, classes = data.check_source(config.data, data.SPLITS)
  build_network(config, classes, shape)
  return workdir


def run(config, workdir, overwrite: bool = False) -> dict:
  """Checks ``config`` and trains into ``workdir``, resuming a run of the same config there (a
  different run's workdir is refused unless ``overwrite``; nothing there is touched before the
  data is loaded). Returns the results."""
  workdir = preflight(config, workdir, overwrite)
  cli.use_compile_cache(config.compile_cache)
  inputs = load_data(config)
  if len(inputs[0]) < config.batch_size:
    raise UserError(f'batch_size {config.batch_size} is larger than the training split '
                    f'({len(inputs[0])} images): lower it or use more data')
  cli.claim_workdir(workdir, config, overwrite, OUTPUTS)
  metrics.setup_logging(workdir)
  log.info(f'training into {workdir} on {jax.default_backend()} (the config is in '
           f'{workdir / "config.json"})')
  training = Training(config, workdir, *inputs)
  log.info(f'params: {training.params}')
  return training.run()


def count_params(config) -> int:
  """The parameter count of ``config``'s network, built abstractly (nothing runs)."""
  _check_config(config)
  shape = (config.image_size or 32,) * 2 + (3,)
  net = build_network(config, data.num_classes(config.data), shape)
  return network.param_count(network.variable_shapes(net, shape)['params'])


def main() -> None:
  """``prnas-train`` and ``python -m prnas_jax.train``: retraining, or with ``epochs=0`` the
  parameter count."""
  values = cli.run_flags('Training config file.', 'configs/train_cifar.py')

  def start():
    config, workdir, overwrite = values(need_workdir=lambda config: config.get('epochs') != 0)
    if config.get('epochs') == 0:
      print(f'params: {count_params(config)}')
    else:
      run(config, workdir, overwrite)
  cli.run(start)


if __name__ == '__main__':
  main()
