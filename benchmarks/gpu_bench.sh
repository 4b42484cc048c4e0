#!/usr/bin/env bash
# inferq bench on a lent GPU (see ../shared/gpu/README.md and gpu_check.sh for the preparation):
# the raw model against the same model through the queue, on the same card in the same run.
# The open issue's figures come first (generation); each later step runs only while the script is inside
# its budget (INFERQ_GPU_BUDGET_S, default 270 s), so one device call of 5 minutes always brings them back.
# Every figure file goes into one archive, $OUT/figures.tgz; the tables are printed as each step ends.
source .gpu/setup.sh || exit 1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 INFERQ_REDIS_URL=redis://127.0.0.1:6379/0
export INFERQ_MODELS__EMBED='{"minilm": {"source": "/tmp/models/minilm", "max_length": 256}}'
export INFERQ_MODELS__GENERATE='{"smollm2": {"source": "/tmp/models/smollm2", "max_length": 2048}}'
# A GPU takes far bigger batches than two CPU cores; more task threads hold enough requests to fill them.
export INFERQ_WORKER_CONCURRENCY=768 INFERQ_BATCHING__ENCODE_MAX_TEXTS=512 INFERQ_BATCHING__GENERATE_MAX_PROMPTS=256
out=${OUT:-/tmp/out}; work=/tmp/gpu-figures; mkdir -p "$out" "$work"
budget=${INFERQ_GPU_BUDGET_S:-270}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

step() {  # step NAME COMMAND...: run it if the budget has time left, else say it was skipped
  local name=$1; shift
  if (( SECONDS >= budget )); then echo "== $name: skipped, ${SECONDS} s of ${budget} used"; return; fi
  echo "== $name (at ${SECONDS} s)"
  "$@" 2>&1 | grep -v "through the queue\|it/s\]"
}

# 1. Generation (the open issue): tokens/s against raw HF generate on the same prompts at 256 in flight,
#    then the same load streamed, for the time to the first text and between pieces under it.
step "generate, 256 in flight" inferq bench --kinds generate --concurrency 256 --generate-requests 512 --processes 8 \
  --out "$work/generate"
step "generate, 256 in flight, streamed" inferq bench --kinds generate --concurrency 256 --generate-requests 512 \
  --processes 8 --stream --out "$work/generate-stream"
# 2. What the device process's own Python costs a request on this card (its ceiling once passes are fast).
step "device process, 128 a batch" python -m benchmarks.device_process --batch 128 --requests 40000 --rounds 2
# 3. Feed the GPU: a raw-client backlog drained by the launcher's device process and 1, 4, 8 receivers;
#    msg/s and CPU per message of every process.
for n in 1 4 8; do
  step "backlog, $n receivers" inferq bench --client raw --kinds embed --backlog 50000 \
    --worker-args "--gpus all --receivers $n --kinds embed" --out "$work/backlog-$n"
done
step "Flower's intake" python -m benchmarks.flower_events --backlog 50000 \
  --worker-args "--gpus all --receivers 8 --kinds embed"
step "embed and classify against raw" inferq bench --kinds embed,classify --concurrency 64,512 --requests 4000 \
  --processes 12 --raw-batch 128 --out "$work/encoders"
tar czf "$out/figures.tgz" -C "$work" .
echo "done in ${SECONDS} s; figures in $out/figures.tgz"
