#!/usr/bin/env bash
# The paper's retraining (reference §7.1, §8.1): DL1, DL2, DR and UR in the 20-cell, C=36 network,
# 600 epochs, on CIFAR-10 and CIFAR-100 (UR was retrained on CIFAR-10 only in the paper).
# Pass genotype names to run fewer, extra --config.* overrides after "--"; DATASETS picks the
# data sets (default "cifar10 cifar100"). Outputs: runs/retrain-<genotype>-<dataset>/results.json.
#   scripts/retrain_paper.sh DL2 -- --config.data.tfds_data_dir=/data/tfds
# A genotype searched here: scripts/retrain_paper.sh runs/search-dl2/genotype.json
set -euo pipefail
cd "$(dirname "$0")/.."
genotypes=()
while [[ $# -gt 0 && $1 != -- ]]; do genotypes+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#genotypes[@]} -gt 0 ]] || genotypes=(DL1 DL2 DR UR)
for dataset in ${DATASETS:-cifar10 cifar100}; do
  for g in "${genotypes[@]}"; do
    [[ $g == UR && $dataset == cifar100 && -z ${DATASETS:-} ]] && continue
    name=$(basename "$g" .json)
    python -m prnas_jax.train --config configs/train_cifar.py --config.genotype="$g" \
      --config.data.dataset="$dataset" --workdir "runs/retrain-$name-$dataset" "$@"
  done
done
