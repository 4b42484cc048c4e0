#!/usr/bin/env bash
# The core on a lent GPU (see ../shared/gpu/README.md): GPU tests, then a real worker on CUDA answering
# every kind through Redis. Prepare here with:
#   bash ../shared/gpu/prepare.sh pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
# then run this from the repo root on the device with .gpu carried.
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt" | tail -5
inferq worker --name gpu0@%h > "$out/worker.log" 2>&1 &
worker=$!
python3 - <<'PY' || { tail -30 "$out/worker.log"; kill $worker; exit 1; }
import time
from producer.client import Client
client = Client()
for _ in range(240):
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=1.0)
    if any(info.get("ready") for reply in replies for info in reply.values()):
        break
else:
    raise SystemExit("worker not ready")
PY
python3 benchmarks/gpu_smoke.py --embed 300 --classify 300 --generate 24 --max-new-tokens 32 --out "$out/smoke.json"
kill -TERM $worker; wait $worker
grep -E "loaded|models ready" "$out/worker.log" | cut -c1-200
