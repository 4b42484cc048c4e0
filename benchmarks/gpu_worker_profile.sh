#!/usr/bin/env bash
# Where does a GPU worker's time go? Runs `inferq worker --gpus all` under a burst of single-text embed
# requests, samples every thread's CPU (top -H) and Python stacks (py-spy dump, if carried), then repeats
# with OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false to see whether thread pools fight. Needs .gpu (see
# gpu_workers.sh) with a py-spy wheel copied into .gpu/wheels.
source benchmarks/gpu_env.sh || exit 1
export INFERQ_MODELS__GENERATE='{}'
out=$out/profile; mkdir -p "$out"
one() {  # $1: label; the rest: env assignments for the worker
  local label=$1; shift
  env "$@" inferq worker --gpus all --kinds embed > "$out/$label-launcher.log" 2>&1 &
  local launcher=$!
  for _ in $(seq 120); do inferq check --local --timeout 2 >/dev/null 2>&1 && break; sleep 1; done
  local child; child=$(pgrep -f "producer.cli worker --name" | head -1)
  python3 benchmarks/gpu_smoke.py --embed 600 --classify 0 --generate 0 --out "$out/$label.json" > "$out/$label.txt" 2>&1 &
  local smoke=$!
  sleep 6
  top -H -b -n 1 -d 1 -p "$child" | head -30 > "$out/$label-top.txt"
  echo "threads: $(ls "/proc/$child/task" | wc -l)" >> "$out/$label-top.txt"
  py-spy dump --pid "$child" > "$out/$label-pyspy1.txt" 2>&1
  sleep 2
  py-spy dump --pid "$child" > "$out/$label-pyspy2.txt" 2>&1
  wait $smoke
  kill -TERM $launcher; wait $launcher
  echo "== $label: $(tail -1 "$out/$label.txt")"
  tail -1 "$out/$label-top.txt"; sed -n 7,18p "$out/$label-top.txt"
}
one baseline
one single-threaded-pools OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false MKL_NUM_THREADS=1
