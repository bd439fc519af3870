"""DL2: the PR-DARTS search with the darts_like preset (reference §7), seed 1."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  config.seed = 1
  return config
