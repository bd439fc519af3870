"""The ImageNet input (tfds imagenet2012 faked with tfds.testing.mock_data): crops, batches,
padding, determinism, and one training step of the ImageNet network on it."""
import runpy
import threading
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from prnas_jax import data, imagenet, train, train_step
from prnas_jax.config import train_config


def _data_config(tmp_path):
  c = train_config().data
  c.dataset, c.tfds_data_dir = 'imagenet2012', str(tmp_path)
  return c


def test_crops_have_the_size_and_come_from_the_image():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (47, 90, 3), dtype=np.uint8)
  for _ in range(20):
    assert imagenet.random_resized_crop(rng, image, 32).shape == (32, 32, 3)
  flat = np.full((50, 80, 3), 7, np.uint8)
  np.testing.assert_array_equal(imagenet.center_crop(flat, 16), 7)
  assert imagenet.center_crop(image, 40).shape == (40, 40, 3)


def test_stream_batches(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    stream = imagenet.Stream(_data_config(tmp_path), 'train', 24, workers=4)
    assert len(stream) == 10 and stream.num_classes == 1000
    a = list(stream.epoch_batches(seed=0, epoch=0, batch=4))
    b = list(stream.epoch_batches(seed=0, epoch=0, batch=4))
    c = list(stream.epoch_batches(seed=0, epoch=1, batch=4))
    test = list(imagenet.Stream(_data_config(tmp_path), 'test', 24).eval_batches(4))
  assert len(a) == 2 and a[0]['image'].shape == (4, 24, 24, 3) and a[0]['image'].dtype == np.uint8
  for x, y in zip(a, b):  # the same seed and epoch give the same crops
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  assert [len(t['label']) for t in test] == [4, 4, 4]
  assert (test[-1]['label'] == -1).sum() == 2 and (test[0]['label'] >= 0).all()


def test_not_prepared_says_how(tmp_path):
  with pytest.raises(data.UserError, match='download_and_prepare'):
    imagenet.Stream(_data_config(tmp_path), 'train', 24)


def test_imagenet_training_step_learns_on_one_batch(tmp_path):
  config = train_config()
  config.model.update(stem='imagenet', layers=3, init_channels=4, auxiliary=False)
  config.label_smoothing, config.cutout = 0.1, 0
  with tfds.testing.mock_data(num_examples=8):
    stream = imagenet.Stream(_data_config(tmp_path), 'train', 64, workers=2)
    batch = next(iter(stream.epoch_batches(seed=0, epoch=0, batch=8)))
  net = train.build_network(config, 1000, (64, 64, 3))
  cfg = train_step.TrainConfig(mean=(0.5,) * 3, std=(0.25,) * 3, augment='imagenet',
                          label_smoothing=0.1, cutout=0)
  variables = net.init({'params': jax.random.key(0), 'drop_path': jax.random.key(1)},
                       np.zeros((1, 64, 64, 3), np.float32), train=True)
  state = train_step.create_train_state(variables, cfg)
  losses = []
  for i in range(4):
    state, m = train_step.train_step(state, batch, np.float32(0.05), np.float32(0.0),
                                jax.random.key(i), net=net, cfg=cfg)
    losses.append(float(m['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_imagenet_retraining_runs_end_to_end(tmp_path, monkeypatch):
  """``train.run`` on the ImageNet input: the network built for the streams' image shape, one
  epoch trained and evaluated by the test step compiled in another thread, the results
  written."""
  config = runpy.run_path(str(Path(__file__).parents[1] / 'configs' / 'train_imagenet.py'))[
      'get_config']()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.model.update(layers=3, init_channels=4)
  config.epochs, config.batch_size, config.test_batch_size, config.image_size = 1, 4, 4, 64
  compiled_on, test_step = [], train_step.test_step

  class Recorded:
    def lower(self, *args, **kwargs):
      lowered = test_step.lower(*args, **kwargs)
      return types.SimpleNamespace(compile=lambda: compiled_on.append(threading.get_ident())
                                   or lowered.compile())
  with monkeypatch.context() as patch, tfds.testing.mock_data(num_examples=8):
    patch.setattr(train_step, 'test_step', Recorded())
    results = train.run(config, tmp_path / 'run')
  assert results['finished'] and results['history'][0]['test_loss'] > 0
  assert (tmp_path / 'run' / 'results.json').exists()
  assert len(compiled_on) == 1 and compiled_on[0] != threading.get_ident()


def test_color_jitter_keeps_range_and_shape():
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  out = data.color_jitter(jax.random.key(0), images, (0.0,) * 3, (1.0,) * 3)
  assert out.shape == (6, 8, 8, 3) and float(out.min()) >= 0 and float(out.max()) <= 1
  same = data.color_jitter(jax.random.key(0), images, (0.0,) * 3, (1.0,) * 3, strength=0.0,
                           hue=0.0, flip=False)
  np.testing.assert_allclose(same, images / 255.0, atol=1e-5)
