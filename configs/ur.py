"""UR: the PR-DARTS search without morph restrictions (reference §7)."""
from prnas_jax.config import search_config


def get_config():
  config = search_config()
  config.search.preset = 'unrestricted'
  return config
