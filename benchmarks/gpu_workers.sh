#!/usr/bin/env bash
# GPU workers on a lent GPU (see ../shared/gpu/README.md): the GPU tests (half precision, the launcher pinning
# one worker per GPU, its restart and `inferq check`), then `inferq worker --gpus all` answering a few hundred
# tasks of each kind through Redis, with per-kind throughput, each worker's device and memory. Prepare here:
#   bash ../shared/gpu/prepare.sh pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
# then run from the repo root on the device with .gpu carried.
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt" | tail -5
cp test-artifacts/gpu-launcher.log "$out/" 2>/dev/null
inferq worker --gpus all > "$out/launcher.log" 2>&1 &
launcher=$!
for _ in $(seq 120); do inferq check --local --timeout 2 > "$out/check.txt" 2>&1 && break; sleep 1; done
cat "$out/check.txt"
python3 benchmarks/gpu_smoke.py --embed 400 --classify 400 --generate 200 --max-new-tokens 64 --out "$out/workers.json"
kill -TERM $launcher; wait $launcher; echo "launcher exit $?"
grep -E "supervising|ready for|loaded (embed|generate)|exited|stopped" "$out/launcher.log" | cut -c1-220
