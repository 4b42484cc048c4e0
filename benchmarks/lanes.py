"""``inferq bench --bulk N``: does an interactive request wait behind queued bulk work?

Interactive single-text embeds are sent one at a time (our ``Client``, no coalescing), first with nothing else
queued (their unloaded latency), then while N bulk single-text messages (priority 9, as ``inferq embed --file``
sends them) are draining, pushed at once before the first probe. The figure to hold: the loaded p50 within the
unloaded p50 plus one bulk batch's device time (the batch the device is running when the probe arrives). For
contrast the same backlog is pushed once in the interactive lane, where a probe waits for all of it.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks.backlog import RESULT_PREFIX, wait_for
from benchmarks.bench import device_time, machine, percentile, start_worker, wait_ready, worker_status
from benchmarks.protocol import task_message
from producer.client import Client
from producer.contract import LANE_PRIORITY, queue_keys
from producer.settings import Settings

PUSH_CHUNK = 1000
TEXT = "a short sentence about queues, batching and GPUs"


def _probe_ms(client: Client, count: int, gap_s: float) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        client.embed([f"an interactive request {i}"], timeout=600)
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(gap_s)
    return times


def _push(broker: redis.Redis, count: int, priority: int) -> list[str]:
    messages = [task_message("inferq.embed", "embed", {"texts": [f"{TEXT} {i}"]}, priority=priority)
                for i in range(count)]
    key = queue_keys("embed")[-1 if priority else 0]
    for at in range(0, count, PUSH_CHUNK):
        broker.lpush(key, *(entry for _, entry in messages[at:at + PUSH_CHUNK]))
    return [RESULT_PREFIX + task_id for task_id, _ in messages]


def run_lanes(settings: Settings, bulk: int, probes: int, contrast: bool) -> dict[str, Any]:
    client = Client(settings.model_copy(update={"coalesce_ms": 0.0}))
    broker, backend = redis.Redis.from_url(settings.broker), redis.Redis.from_url(settings.backend)
    try:
        _probe_ms(client, 5, 0.0)  # warm
        unloaded = _probe_ms(client, probes, 0.05)
        before, started = worker_status(client), time.perf_counter()
        keys = _push(broker, bulk, LANE_PRIORITY["bulk"])
        loaded = _probe_ms(client, probes, 0.1)
        left_when_done = bulk - sum(value is not None for value in backend.mget(keys))
        missing = wait_for(backend, keys, time.perf_counter() + 1800)
        drained = time.perf_counter() - started
        timing = device_time(before, worker_status(client), drained)
        report: dict[str, Any] = {
            "bulk_messages": bulk, "probes": probes,
            "unloaded_ms_p50": round(percentile(unloaded, 50), 1),
            "unloaded_ms_p95": round(percentile(unloaded, 95), 1),
            "loaded_ms_p50": round(percentile(loaded, 50), 1), "loaded_ms_p95": round(percentile(loaded, 95), 1),
            "loaded_ms_max": round(max(loaded), 1),
            "device_ms_per_batch": round(timing["device_ms_per_batch"], 1),
            "bulk_left_when_probes_done": left_when_done, "bulk_drain_s": round(drained, 1),
            "bulk_unanswered": missing,
        }
        report["within_target"] = report["loaded_ms_p50"] <= report["unloaded_ms_p50"] + report["device_ms_per_batch"]
        for at in range(0, len(keys), 1000):
            backend.delete(*keys[at:at + 1000])
        if contrast:  # the same backlog in the interactive lane: first come, first served
            keys = _push(broker, bulk, 0)
            one = _probe_ms(client, 1, 0.0)
            wait_for(backend, keys, time.perf_counter() + 1800)
            report["same_lane_probe_ms"] = round(one[0], 1)
            for at in range(0, len(keys), 1000):
                backend.delete(*keys[at:at + 1000])
        return report
    finally:
        client.close()


def run_lanes_bench(bulk: int, probes: int, start: bool, out_dir: Path, worker_args: list[str] | None,
                    contrast: bool = True) -> dict[str, Any]:
    settings = Settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = start_worker(out_dir / "bench-worker.log", worker_args) if start else None
    try:
        client = Client(settings)
        try:
            wait_ready(client, worker)
        finally:
            client.close()
        report = {"machine": machine(), "host": socket.gethostname(), "worker_args": worker_args,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), **run_lanes(settings, bulk, probes, contrast)}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
    (out_dir / f"lanes-{socket.gethostname()}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}; {bulk} bulk single-text embeds queued; worker: "
          f"{' '.join(worker_args or []) or 'inferq worker (one process)'}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "host", "date")}, indent=2))
    return report
