"""DR: the PR-DARTS search with the depth-restricted preset r_depth (reference §7)."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  config.search.preset = 'r_depth'
  return config
