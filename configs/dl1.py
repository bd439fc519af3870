"""DL1: the PR-DARTS search with the darts_like preset (reference §7), seed 0."""
from prnas_jax.config import search_config


def get_config():
  return search_config()
