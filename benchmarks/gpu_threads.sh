#!/usr/bin/env bash
# Once the forward passes run in the device process, what do the worker's task threads cost? The same
# plain-client embed load against a worker with 768 task threads (the GPU scripts' default) and with 128.
# (py-spy --gil on the worker there returned only a handful of samples; threads count is the lever measured.)
source benchmarks/gpu_env.sh || exit 1
export INFERQ_MODELS__GENERATE='{}' INFERQ_DEVICE_PROCESS=true INFERQ_BATCHING__ENCODE_MAX_TEXTS=512
for threads in 768 128; do
  INFERQ_WORKER_CONCURRENCY=$threads inferq worker --name threads@%h --kinds embed > "$out/worker-$threads.log" 2>&1 &
  worker=$!
  for _ in $(seq 120); do inferq check --timeout 2 >/dev/null 2>&1 && break; sleep 1; done
  echo "== $threads task threads"
  inferq bench --no-worker --kinds embed --concurrency 512 --requests 6000 --processes 12 --raw-batch 128 \
    --out "$out/threads-$threads" 2>&1 | grep -E "^embed|raw encode"
  kill -TERM $worker; wait $worker
done
