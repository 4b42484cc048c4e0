#!/usr/bin/env bash
# inferq bench on a lent GPU (see ../shared/gpu/README.md and gpu_check.sh for the preparation):
# the raw model against the same model through the queue, on the same card in the same run.
source .gpu/setup.sh || exit 1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 INFERQ_REDIS_URL=redis://127.0.0.1:6379/0
export INFERQ_MODELS__EMBED='{"minilm": {"source": "/tmp/models/minilm", "max_length": 256}}'
export INFERQ_MODELS__GENERATE='{"smollm2": {"source": "/tmp/models/smollm2", "max_length": 2048}}'
# A GPU takes far bigger batches than two CPU cores; more task threads hold enough requests to fill them.
export INFERQ_WORKER_CONCURRENCY=768 INFERQ_BATCHING__ENCODE_MAX_TEXTS=512 INFERQ_BATCHING__GENERATE_MAX_PROMPTS=256
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Feed the GPU first: a raw-client backlog drained by one whole worker, then by the launcher's device process
# and 1, 2, 4, 8 receivers; msg/s, CPU per message of every process (the device process's too)
inferq bench --client raw --kinds embed --backlog 50000 --worker-args "--kinds embed --name gpubench@%h" --out "$out"
for n in 1 2 4 8; do
  inferq bench --client raw --kinds embed --backlog 50000 --worker-args "--gpus all --receivers $n --kinds embed" --out "$out"
done
python -m benchmarks.flower_events --backlog 50000 --worker-args "--gpus all --receivers 8 --kinds embed"
inferq bench --kinds embed,classify --concurrency 64,512 --requests 4000 --processes 12 --raw-batch 128 --out "$out" 2>&1 | grep -v "through the queue"
inferq bench --kinds generate --concurrency 256 --generate-requests 512 --processes 8 --out "$out" 2>&1 | grep -v "through the queue"
ls "$out"
