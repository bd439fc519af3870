#!/usr/bin/env bash
# A genotype in the ImageNet mobile setting (reference §8.2): 14 cells, C=48, 250 epochs, batch
# 256, label smoothing 0.1, from a prepared tfds imagenet2012 copy (array_record).
#   scripts/retrain_imagenet.sh DL2 /data/tfds [--config.* overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
genotype=${1:?give a genotype name or file}
data_dir=${2:?give the tfds data dir that holds imagenet2012}
shift 2
python -m prnas_jax.train --config configs/train_imagenet.py --config.genotype="$genotype" \
  --config.data.tfds_data_dir="$data_dir" --workdir "runs/imagenet-$(basename "$genotype" .json)" "$@"
