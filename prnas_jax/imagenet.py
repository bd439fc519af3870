"""ImageNet input for retraining (reference §8.2): tfds ``imagenet2012`` read by index from a
prepared array_record copy, decoded and cropped on host threads, one batch ahead of the step.

Training crops are Inception-style random resized crops (area 8-100 %, aspect 3/4-4/3) resized
to the training size; flip and colour jitter run inside the jitted step. Evaluation resizes the
shorter side to size/0.875 and takes the centre crop.
"""
from __future__ import annotations

import concurrent.futures
import math

import jax
import numpy as np
from PIL import Image

from prnas_jax import data, parallel

SPLITS = {'train': 'train', 'test': 'validation'}


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # the whole image, clipped to the aspect range
    ratio = min(max(w / h, 3 / 4), 4 / 3)
    cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
    cw, ch = min(cw, w), min(ch, h)
    y, x = (h - ch) // 2, (w - cw) // 2
  crop = Image.fromarray(image[y:y + ch, x:x + cw])
  return np.asarray(crop.resize((size, size), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  short = round(size / 0.875)
  scale = short / min(h, w)
  resized = np.asarray(Image.fromarray(image).resize(
      (max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR))
  y, x = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
  return resized[y:y + size, x:x + size]


class Stream:
  """A tfds split read batch by batch: ``epoch_batches`` for training (shuffled, whole batches),
  ``eval_batches`` for evaluation (in order, the last batch padded with label -1)."""

  def __init__(self, data_config, split: str, image_size: int, workers: int = 16):
    self.source = data.tfds_source(data_config.dataset, SPLITS[split], data_config.tfds_data_dir)
    self.num_classes = int(self.source.dataset_info.features['label'].num_classes)
    self.image_size = image_size
    self._pool = concurrent.futures.ThreadPoolExecutor(workers)  # decodes and crops
    self._ahead = concurrent.futures.ThreadPoolExecutor(1)  # assembles the next batch

  def __len__(self):
    return len(self.source)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the batches' images."""
    return self.image_size, self.image_size, 3

  def _load(self, indices, crop):
    images = np.zeros((len(indices), self.image_size, self.image_size, 3), np.uint8)
    labels = np.full(len(indices), -1, np.int32)

    def one(i):
      if indices[i] >= 0:
        ex = self.source[int(indices[i])]
        image = np.asarray(ex['image'])
        image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
        images[i] = crop(i, image)
        labels[i] = ex['label']
    list(self._pool.map(one, range(len(indices))))
    return {'image': images, 'label': labels}

  def _prefetched(self, batches, crop_of):
    """Yields the loaded batches, loading the next one while the caller works on this one."""
    ahead = None
    for n, indices in enumerate(batches):
      future = self._ahead.submit(self._load, indices, crop_of(n))
      if ahead is not None:
        yield ahead.result()
      ahead = future
    if ahead is not None:
      yield ahead.result()

  def epoch_batches(self, seed: int, epoch: int, batch: int):
    """This process's part (``batch`` rows) of each global batch of an epoch: shuffled, whole
    batches, from its shard of the examples."""
    shard = parallel.process_shard({'index': np.arange(len(self))})['index']
    order = shard[data.epoch_batches(np.random.default_rng([seed, epoch]), len(shard), batch)]
    process = jax.process_index()

    def crop_of(n):
      per_image = np.random.default_rng([seed, epoch, n, process]).spawn(batch)
      return lambda i, image: random_resized_crop(per_image[i], image, self.image_size)
    return self._prefetched(order, crop_of)

  def eval_batches(self, batch: int):
    """All examples in order in global batches of ``batch``, the last padded with label -1; this
    process's rows of each."""
    n, local = len(self), batch // jax.process_count()
    rows = np.arange(0, n + -n % batch).reshape(-1, batch)
    rows = rows[:, jax.process_index() * local:(jax.process_index() + 1) * local]
    return self._prefetched(np.where(rows < n, rows, -1),
                            lambda _: lambda i, image: center_crop(image, self.image_size))
