"""First-order DARTS on the same engine: one 50-epoch stage over the 8 DARTS candidates, no
morphs (DARTS' batch 64, alpha lr 3e-4, cosine to 0.001)."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  config.search.start = 'darts'
  config.search.batch_size = 64
  config.search.lr_min = 0.001
  config.search.alpha_lr = 3e-4
  config.search.drop_zero_last = True
  stages = config.search.stages
  stages.epochs, stages.grace_epochs = (50,), (0,)
  stages.keep, stages.new = (1,), (0,)
  stages.add_layers, stages.add_width, stages.skip_dropout = (0,), (0,), (0.0,)
  return config
