"""Every part of the method on CPU in minutes: three short stages on a 3-cell, C=8 supernet
over 2000 training images (prune, morph, carry-over, re-initialisation, final derivation)."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  config.data.max_train = 2000
  s = config.search
  s.layers, s.init_channels, s.batch_size, s.valid_epochs = 3, 8, 32, 1
  s.stages.epochs, s.stages.grace_epochs = (2, 2, 2), (1, 1, 0)
  s.stages.keep, s.stages.new = (4, 3, 1), (2, 1, 0)
  s.stages.add_layers, s.stages.add_width = (0, 0, 0), (0, 0, 0)
  s.stages.skip_dropout = (0.0, 0.0, 0.0)
  config.log_every = 10
  return config
