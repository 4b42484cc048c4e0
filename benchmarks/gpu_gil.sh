#!/usr/bin/env bash
# Does the GIL hand-off limit a GPU worker? On a GPU the device thread is Python-bound (kernel launches hold
# the GIL), so the consumer and task threads wait up to sys.getswitchinterval() (5 ms) for each turn.
# Runs one embed worker per switch interval and the same burst of single-text requests against each.
source benchmarks/gpu_env.sh || exit 1
export INFERQ_MODELS__GENERATE='{}'
out=$out/gil; mkdir -p "$out"
for interval in 0.005 0.0005; do
  python3 -c "import sys; sys.setswitchinterval(float(sys.argv.pop(1))); from producer.cli import main; main()" \
    "$interval" worker --name gpu0@%h --kinds embed > "$out/worker-$interval.log" 2>&1 &
  worker=$!
  for _ in $(seq 120); do inferq check --timeout 2 >/dev/null 2>&1 && break; sleep 1; done
  python3 benchmarks/gpu_smoke.py --embed 1000 --classify 0 --generate 0 > "$out/smoke-$interval.txt" 2>&1
  echo "switch interval $interval s: $(tail -1 "$out/smoke-$interval.txt")"
  kill -TERM $worker; wait $worker
done
