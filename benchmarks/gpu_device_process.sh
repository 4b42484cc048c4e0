#!/usr/bin/env bash
# Does moving the encoder's forward passes out of the worker process (device_process = true) free the GPU
# from the worker's GIL? The same plain-client embed load against a worker without and with it, on one card
# in one run, each beside the raw model (see ../shared/gpu/README.md for the preparation).
source benchmarks/gpu_env.sh || exit 1
export INFERQ_MODELS__GENERATE='{}'
export INFERQ_WORKER_CONCURRENCY=768 INFERQ_BATCHING__ENCODE_MAX_TEXTS=512
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for device_process in false true; do
  echo "== device_process = $device_process"
  INFERQ_DEVICE_PROCESS=$device_process inferq bench --kinds embed --concurrency 64,512 --requests 4000 \
    --processes 12 --raw-batch 128 --out "$out/device-process-$device_process" 2>&1 | grep -v "through the queue"
done
