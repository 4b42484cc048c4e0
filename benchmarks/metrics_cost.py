"""What the worker metrics cost the device loop per message, timed alone.

    python -m benchmarks.metrics_cost                 # in memory (no INFERQ_METRICS_PORT) and multiprocess files

Runs, in a fresh interpreter for each mode, exactly the calls ``workers/device/loop.py`` makes for one encoder
batch (texts, one queue wait per request, batch size, busy time and run time, the outcomes counted together)
for batches of 1, 16 and 128 requests, and prints CPU microseconds per message. ``multiprocess`` is the mode a
served host runs in (``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is imported: every value lives
in a memory-mapped file); ``memory`` is a worker without a metrics port.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

BATCHES = (1, 16, 128)


def measure(messages: int) -> dict[int, float]:
    from workers.device.metrics import ModelMetrics

    metrics = ModelMetrics.of("embed/bench")
    costs = {}
    for size in BATCHES:
        arrived = [time.monotonic()] * size
        started = time.process_time()
        for _ in range(messages // size):
            now = time.monotonic()
            metrics.batch_texts.observe(size)
            for at in arrived:
                metrics.queue_wait.observe(now - at)
            metrics.batch_requests.observe(size)
            metrics.busy.inc(0.001)
            metrics.run.observe(0.001)
            metrics.finished(Counter({"ok": size}))
        costs[size] = (time.process_time() - started) / (messages // size * size) * 1e6
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--child", choices=["memory", "multiprocess"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        costs = measure(args.messages)
        print(args.child, " ".join(f"{size}:{cost:.2f}" for size, cost in costs.items()))
        return
    print(f"CPU us per message by batch size ({', '.join(map(str, BATCHES))} requests a batch), "
          f"{args.messages} messages")
    for mode in ("memory", "multiprocess"):
        with tempfile.TemporaryDirectory() as folder:
            env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = folder
            subprocess.run([sys.executable, "-m", "benchmarks.metrics_cost", "--child", mode,
                            "--messages", str(args.messages)], env=env, check=True)


if __name__ == "__main__":
    main()
