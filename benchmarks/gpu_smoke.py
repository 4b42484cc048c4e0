"""Through the queue on whatever device the worker has: N tasks of each kind, per-kind throughput.

This is the core path, before batching: each task is one forward pass (or one generate call) on the
worker's device thread. Run it against a started worker:

    python benchmarks/gpu_smoke.py --embed 300 --classify 300 --generate 24 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from producer.client import Client, Handle
from producer.settings import Kind, Settings


def run(client: Client, kind: Kind, count: int, kwargs: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    handles: list[Handle[Any]] = [client.submit(kind, **kwargs(i)) for i in range(count)]
    sent = time.perf_counter()
    results = [handle.get(timeout=600) for handle in handles]
    finished = time.perf_counter()
    figures: dict[str, Any] = {"kind": kind, "tasks": count, "send_s": round(sent - started, 3),
                               "total_s": round(finished - started, 3),
                               "tasks_per_s": round(count / (finished - started), 1)}
    if kind == "generate":
        tokens = sum(r["completion_tokens"] for r in results)
        figures["tokens_per_s"] = round(tokens / (finished - started), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embed", type=int, default=300)
    parser.add_argument("--classify", type=int, default=300)
    parser.add_argument("--generate", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    client = Client(Settings())
    status = client.app.control.broadcast("inferq_status", reply=True, timeout=5.0)
    plans: list[tuple[Kind, int, Callable[[int], dict[str, Any]]]] = [
        ("embed", args.embed, lambda i: {"texts": [f"sentence number {i} about queues and GPUs"]}),
        ("classify", args.classify, lambda i: {"texts": [f"the match {i} ended in a draw"],
                                               "labels": ["sports", "finance", "cooking"]}),
        ("generate", args.generate, lambda i: {"prompt": f"Story {i}: once upon a time",
                                               "max_new_tokens": args.max_new_tokens}),
    ]
    rows = [run(client, kind, count, kwargs) for kind, count, kwargs in plans if count]
    status_after = client.app.control.broadcast("inferq_status", reply=True, timeout=5.0)
    report = {"workers_before": status, "workers_after": status_after, "runs": rows}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=2)
    for reply in status_after:
        for node, info in reply.items():
            print(f"{node}: device={info.get('device')} gpu={info.get('gpu')} "
                  f"memory_allocated={info.get('memory_allocated_mib')} MiB "
                  f"max_allocated={info.get('max_memory_allocated_mib')} MiB")
    print(f"{'kind':<10}{'tasks':>7}{'seconds':>9}{'tasks/s':>9}{'tokens/s':>10}")
    for row in rows:
        print(f"{row['kind']:<10}{row['tasks']:>7}{row['total_s']:>9}{row['tasks_per_s']:>9}"
              f"{row.get('tokens_per_s', ''):>10}")
    client.close()


if __name__ == "__main__":
    main()
