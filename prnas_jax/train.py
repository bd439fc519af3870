"""``python -m prnas_jax.train --config configs/train_cifar.py --config.genotype=DL2 --workdir W``:
retrains a genotype from scratch (reference §8) and reports the final and best test accuracy.

A checkpoint is written after every epoch; rerunning the same command resumes from the newest
one and ends exactly where an uninterrupted run would. ``--config.epochs=0`` only builds the
network and prints ``params: N`` (without the auxiliary head, as the papers count).
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax import checkpoint, cli, data, genotype, metrics, network, parallel, steps
from prnas_jax.config import validate_train
from prnas_jax.errors import UserError
from prnas_jax.files import write_json
from prnas_jax.metrics import log


def learning_rate(config, epoch: int) -> float:
  """The learning rate of ``epoch`` (constant within an epoch, as in the reference)."""
  n = config.epochs
  if config.schedule == 'cosine':
    lr = steps.epoch_cosine(config.lr, config.lr_min, n, epoch)
  elif n - epoch > 5:  # 'linear': to a fifth of the way down over n-5 epochs, then a short tail
    lr = config.lr * (n - 5 - epoch) / (n - 5)
  else:
    lr = config.lr * (n - epoch) / ((n - 5) * 5)
  if epoch < config.warmup_epochs:
    lr *= (epoch + 1) / config.warmup_epochs
  return lr


def build_network(config, num_classes: int) -> network.Network:
  m = config.model
  return network.Network(genotype.load(config.genotype), layers=m.layers,
                         channels=m.init_channels, num_classes=num_classes,
                         auxiliary=m.auxiliary, stem=m.stem, dw_form=m.dw_form or None)


class Training:
  """One retraining run in ``workdir``: data, network, state, and the epoch loop."""

  def __init__(self, config, workdir: Path, train: data.Split, test: data.Split):
    self.config, self.workdir = config, workdir
    mean, std = data.mean_std(config.data, train)
    self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
    if len(train.labels) < config.batch_size:
      raise UserError(f'batch_size {config.batch_size} is larger than the training split '
                      f'({len(train.labels)} images): lower it or use more data')
    self.local_batch = parallel.check_batch(config.batch_size, 'batch_size')
    parallel.check_batch(config.test_batch_size, 'test_batch_size')
    self.train = jax.device_put(parallel.process_shard({'image': train.images,
                                                        'label': train.labels}))
    self.test = _padded(test, config.test_batch_size)
    self.net = build_network(config, train.num_classes)
    self.cfg = steps.TrainConfig(
        mean=self.mean, std=self.std, momentum=config.momentum,
        weight_decay=config.weight_decay, clip=config.clip, aux_weight=config.model.aux_weight,
        label_smoothing=config.label_smoothing, cutout=config.cutout)
    self.steps_per_epoch = len(self.train['label']) // self.local_batch
    self.key = jax.random.key(config.seed)
    # XLA's RngBitGenerator: the initialiser compiles 4x faster than with threefry keys
    self.init_key = jax.random.key(config.seed, impl='unsafe_rbg')
    self.checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', config.checkpoints_kept)

  def initial_state(self) -> steps.TrainState:
    init = jax.jit(lambda k, x: self.net.init({'params': k, 'drop_path': k}, x, train=True))
    variables = init(self.init_key, jnp.zeros((1, *self.train['image'].shape[1:]), jnp.float32))
    return steps.create_train_state(variables, self.cfg)

  def resume(self):
    """The newest checkpoint's state and record, or a fresh state and record."""
    step = self.checkpoints.latest()
    if step is None:
      return parallel.replicate(self.initial_state()), {'epoch': 0, 'history': [],
                                                        'scalars_lines': 0}
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=parallel.replicated()),
                            jax.eval_shape(self.initial_state))
    state, record = self.checkpoints.restore(step, template)
    metrics.truncate_scalars(self.workdir, record['scalars_lines'])
    log.info(f'resuming after epoch {record["epoch"]} from {self.checkpoints.directory / str(step)}')
    return state, record

  def run(self) -> dict:
    c = self.config
    state, record = self.resume()
    if record['epoch'] == c.epochs:
      self.checkpoints.close()
      return self.results(record)
    writer = metrics.Writer(self.workdir)
    progress = metrics.Progress((c.epochs - record['epoch']) * self.steps_per_epoch, c.log_every)
    t0 = time.perf_counter()
    step = steps.train_step.lower(state, self._batch(np.arange(self.local_batch)), np.float32(0),
                                  np.float32(0), self.key, net=self.net, cfg=self.cfg).compile()
    log.info(f'compiled the training step in {time.perf_counter() - t0:.1f} s')
    for epoch in range(record['epoch'], c.epochs):
      lr = learning_rate(c, epoch)
      drop = c.model.drop_path * epoch / c.epochs
      order = data.epoch_batches(np.random.default_rng([c.seed, epoch]), len(self.train['label']),
                                 self.local_batch)
      epoch_key = jax.random.fold_in(self.key, epoch)
      sums = {'loss': 0.0, 'accuracy': 0.0}
      t0 = time.perf_counter()
      for n, idx in enumerate(order):
        state, m = step(state, self._batch(idx), np.float32(lr), np.float32(drop),
                        jax.random.fold_in(epoch_key, n))
        sums = {k: sums[k] + m[k] for k in sums}
        progress.update(f'epoch {epoch + 1}/{c.epochs}', n + 1, len(order), c.batch_size,
                        lambda: {'loss': float(sums['loss']) / (n + 1), 'lr': lr})
      train = {k: float(v) / len(order) for k, v in sums.items()}
      seconds = time.perf_counter() - t0
      if not math.isfinite(train['loss']):
        raise UserError(f'the training loss became {train["loss"]} in epoch {epoch}: lower lr, '
                        'or check the data; the last good checkpoint is kept')
      test = self.evaluate(state)
      entry = {'epoch': epoch, 'lr': lr, 'drop_path': drop, 'seconds': seconds,
               'images_per_s': len(order) * c.batch_size / seconds,
               'train_loss': train['loss'], 'train_accuracy': train['accuracy'],
               'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
      log.info(f'epoch {epoch + 1}/{c.epochs}: train loss {train["loss"]:.4f} acc '
               f'{train["accuracy"]:.4f}, test loss {test["loss"]:.4f} acc '
               f'{test["accuracy"]:.4f} ({seconds:.1f} s, {entry["images_per_s"]:.1f} img/s)')
      writer.scalars(epoch, {'epoch/lr': lr, 'epoch/drop_path_prob': drop,
                             'epoch/seconds': seconds, 'epoch/batch_size': c.batch_size,
                             'epoch/images_per_s': entry['images_per_s'],
                             'train/loss': train['loss'], 'train/accuracy': train['accuracy'],
                             'test/loss': test['loss'], 'test/accuracy': test['accuracy']})
      record = {'epoch': epoch + 1, 'history': record['history'] + [entry],
                'scalars_lines': writer.lines}
      self.checkpoints.save(epoch + 1, state, record)
      write_json(self.workdir / 'results.json', self.results(record))
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
    return network.param_count(network.variable_shapes(self.net, self.train['image'].shape[1:])[
        'params'])

  def _batch(self, idx):
    return parallel.shard_batch({'image': self.train['image'][idx],
                                 'label': self.train['label'][idx]})

  def evaluate(self, state) -> dict:
    """Plain cross-entropy and accuracy on the whole test split."""
    total = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
    for batch in self.test:
      out = steps.test_step(state, batch, net=self.net, mean=self.mean, std=self.std)
      total = {k: total[k] + out[k] for k in total}
    count = int(total['count'])
    return {'loss': float(total['loss_sum']) / count, 'accuracy': int(total['correct']) / count}


def _padded(split: data.Split, batch: int) -> list[dict]:
  """``split`` in global batches of ``batch``, the last one padded with label -1, on device
  (each process holds its slice of each)."""
  n = len(split.labels)
  pad = -n % batch
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.full(pad, -1, split.labels.dtype)])
  local = batch // jax.process_count()
  rows = lambda i: slice(i + jax.process_index() * local, i + (jax.process_index() + 1) * local)
  return [parallel.shard_batch({'image': images[rows(i)], 'label': labels[rows(i)]})
          for i in range(0, n + pad, batch)]


def load_data(config) -> tuple[data.Split, data.Split]:
  train = data.load_split(config.data, 'train')
  if config.data.max_train:
    train = data.subset(train, config.data.max_train, config.seed)
  return train, data.load_split(config.data, 'test')


def run(config, workdir, overwrite: bool = False) -> dict:
  """Validates ``config`` and trains into ``workdir``, resuming a run of the same config there
  (a different run's workdir is refused unless ``overwrite``). Returns the results."""
  validate_train(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cli.claim_workdir(workdir, config, overwrite, outputs=('checkpoints', 'scalars.jsonl', 'tb',
                                                         'results.json'))
  metrics.setup_logging(workdir)
  log.info(f'training into {workdir} on {jax.default_backend()}:\n{config}')
  training = Training(config, workdir, *load_data(config))
  log.info(f'params: {training.params}')
  return training.run()


def count_params(config) -> int:
  """The parameter count of ``config``'s network, built abstractly (nothing runs)."""
  validate_train(config)
  shape = (config.image_size or 32,) * 2 + (3,)
  net = build_network(config, data.num_classes(config.data))
  return network.param_count(network.variable_shapes(net, shape)['params'])


def main(config, workdir, overwrite) -> None:
  if config.epochs == 0:
    print(f'params: {count_params(config)}')
  else:
    run(config, workdir, overwrite)


if __name__ == '__main__':
  _FLAGS = cli.run_flags('Training config file.', 'configs/train_cifar.py')
  cli.run(lambda: main(*_FLAGS(need_workdir=lambda config: config.epochs > 0)))
