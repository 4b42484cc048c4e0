#!/usr/bin/env bash
# The heavy versions of the fault drills in tests/: 10,000 fuzzed payloads and a 50,000-task soak against a
# real worker and Redis (as scripts/test.sh sets them up), figures to benchmarks/results/drills-<host>.txt.
#   bash benchmarks/drills.sh            # after bash scripts/install.sh; Redis on 127.0.0.1:6379
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/drills-$(hostname).txt
{
  echo "# $(date -u +%F) on $(hostname): $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  INFERQ_DRILL_FUZZ_EXAMPLES=${INFERQ_DRILL_FUZZ_EXAMPLES:-100} INFERQ_DRILL_SOAK_TASKS=${INFERQ_DRILL_SOAK_TASKS:-50000} \
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider --durations=5 --timeout=3600 \
    tests/test_fuzz.py tests/test_soak.py 2>&1 | grep -vE "Writing model shards|^$"
} | tee "$out"
