"""P-DARTS on the same engine: three 25-epoch stages (10 weights-only) growing 5 -> 11 -> 17
cells while the 8 DARTS candidates drop to 5 -> 3 -> 1, skip dropout 0.1/0.4/0.7, batch 96,
and at most 2 skip-connects in the final normal cell."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  s = config.search
  s.start, s.layers, s.batch_size, s.lr_min = 'darts', 5, 96, 0.0
  s.keep_morphable, s.drop_zero_last, s.max_skip_normal = False, True, 2
  s.stages.epochs, s.stages.grace_epochs = (25, 25, 25), (10, 10, 10)
  s.stages.keep, s.stages.new = (5, 3, 1), (0, 0, 0)
  s.stages.add_layers, s.stages.add_width = (0, 6, 12), (0, 0, 0)
  s.stages.skip_dropout = (0.1, 0.4, 0.7)
  return config
