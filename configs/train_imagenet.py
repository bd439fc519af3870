"""Retraining in the ImageNet mobile setting (reference §8.2): two stride-2 stems, 14 cells,
C=48, 250 epochs, batch 256, SGD 0.1 with linear decay and a 5-epoch tail, weight decay 3e-5,
label smoothing 0.1, no auxiliary head, no drop-path; tfds imagenet2012 (prepared copy)."""
from prnas_jax.config import train_config


def get_config():
  c = train_config()
  c.data.dataset = 'imagenet2012'
  c.model.update(stem='imagenet', layers=14, init_channels=48, auxiliary=False, drop_path=0.0)
  c.epochs, c.batch_size, c.test_batch_size = 250, 256, 250
  c.schedule, c.lr, c.weight_decay = 'linear', 0.1, 3e-5
  c.label_smoothing, c.cutout, c.image_size = 0.1, 0, 224
  return c
