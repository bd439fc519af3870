#!/usr/bin/env bash
# The benchmark suite on a GPU machine in one go (README, Performance): installs the two
# pure-Python packages such a machine may lack (ml_collections, tensorboardX) from the wheels in
# .whl/, then runs scripts/bench.py within a 440 s budget, every case cold (all at once), then
# warm from the persistent compilation cache (one at a time), and writes bench.json, bench.md and
# bench.log into $OUT (else runs/bench). Further arguments go to bench.py (e.g. --cases
# first,retrain, --variant NAME ARG...). With DEPTHWISE_BATCH=N set, it first times the
# depthwise forms alone at that batch (scripts/bench_depthwise.py, into depthwise.jsonl).
#
# The wheels, fetched once where pip reaches the index, from the repository root (.whl/ is
# ignored by git; the packages are pure Python, so any machine can fetch them):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0 tensorboardX==2.6.5
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench}
mkdir -p "$out"
if ! python3 -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [[ -n "${DEPTHWISE_BATCH:-}" ]]; then
  python3 scripts/bench_depthwise.py --batch "$DEPTHWISE_BATCH" --repeats 50 \
    2> "$out/depthwise.log" | tee "$out/depthwise.jsonl"
fi
PYTHONUNBUFFERED=1 python3 scripts/bench.py --jobs 9 --budget_s 440 --compile_cache \
  --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
