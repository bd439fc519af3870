"""Retraining on CIFAR-10 (reference §8.1): 20 cells, C=36, auxiliary head, drop-path 0.3,
cutout 16, SGD 0.025 cosine over 600 epochs, batch 128. CIFAR-100: --config.data.dataset=cifar100.
"""
from prnas_jax.config import train_config


def get_config():
  return train_config()
