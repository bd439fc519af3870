"""A short retraining on CPU, for the quick start: the genotype in a 3-cell, C=16 network, two
epochs over 2500 training images (a class-balanced subset), tested on the whole test split."""
from prnas_jax.config import train_config


def get_config():
  c = train_config()
  c.genotype = 'runs/tiny/genotype.json'  # the quick start's search
  c.model.update(layers=3, init_channels=16, auxiliary=False, drop_path=0.1)
  c.data.max_train = 2500
  c.epochs, c.batch_size, c.lr, c.cutout = 2, 64, 0.05, 0
  c.log_every = 10
  return c
