#!/usr/bin/env bash
# The paper's searches on CIFAR-10 (reference §7.1): DL1 and DL2 (darts_like, seeds 0 and 1),
# DR (r_depth), UR (unrestricted); 9 stages, 100 epochs each. One after another; pass a subset
# of names to run fewer, and extra --config.* overrides after "--".
#   scripts/search_paper.sh                          # all four, CIFAR-10 as downloaded or tfds
#   DATA="--config.data.dataset=folder --config.data.folder=/data/cifar10" scripts/search_paper.sh dl2
# Outputs: runs/search-<name>/ (genotype.json, stages/, report.png, tb/). Rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
names=()
while [[ $# -gt 0 && $1 != -- ]]; do names+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#names[@]} -gt 0 ]] || names=(dl1 dl2 dr ur)
for name in "${names[@]}"; do
  python -m prnas_jax.search --config "configs/$name.py" --workdir "runs/search-$name" \
    ${DATA:-} "$@"
done
