"""What the device process's own Python costs a request, beside the model's pass.

    python -m benchmarks.device_process [--requests 20000] [--batch 34] [--rounds 3]

Uses the embed models of the settings (``INFERQ_MODELS__EMBED``; the first alias) on the settings' device
(``INFERQ_DEVICE``). The pass alone runs on that device too: on a CPU it is the thread's CPU time, on a GPU
the wall time to the end of the pass, which is what the device thread spends on it there.
Starts a device process as a worker does (``device_process = true``), connects to it as a receiver does,
and sends it ``--requests`` single-text embed requests a wave of ``--batch`` at a time (one send per wave,
two waves in flight, as receivers under a backlog hand off), with token ids of short texts prepared
beforehand. Reports the device process's CPU per request from ``/proc`` (every thread: its device loop,
its connection and outbox threads), and the model's pass alone at the same batch size, timed in this
process with one torch thread: the difference is what the device process adds to each request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from producer.settings import Settings
from workers.device.passes import EncodeJob
from workers.device.process import DeviceProcess
from workers.device.remote import RemoteDevice
from workers.models.embed import PooledEmbedder
from workers.models.loading import pick_device

_TEXTS = ["the quick brown fox jumps over the lazy dog", "a short question about the weather today",
          "how do I reset my password", "shipping to Lisbon takes three days",
          "the invoice total does not match the order", "refund please", "great product, would buy again"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _drive(remote: RemoteDevice, key: str, rows: list[list[int]], requests: int, batch: int) -> float:
    """Sends every request, two waves in flight; returns the wall seconds."""
    in_flight: deque[list[Future[Any]]] = deque()
    remote.hold_this_thread()
    started, sent = time.perf_counter(), 0
    while sent < requests or in_flight:
        while sent < requests and len(in_flight) < 2:
            wave = [remote.submit(key, EncodeJob([rows[(sent + i) % len(rows)]]), 1,
                                  len(rows[(sent + i) % len(rows)]), 60.0)
                    for i in range(min(batch, requests - sent))]
            remote.flush()
            in_flight.append(wave)
            sent += len(wave)
        for future in in_flight.popleft():
            future.result(timeout=60)
    return time.perf_counter() - started


def _batches(remote: RemoteDevice, key: str) -> int:
    """Batches the device process has run for this key: two waves waiting together run as one batch."""
    return int(remote.stats()["counts"].get(f"{key}:batches", 0))


def _model_alone(embedder: PooledEmbedder, rows: list[list[int]], batch: int, passes: int = 200) -> float:
    """Seconds per request of the pass alone (pad, forward, pool, rows back on the CPU) at this batch size:
    this thread's CPU time on a CPU, the wall time on a GPU (the pass ends with its rows copied back)."""
    torch.set_num_threads(1)
    clock = time.perf_counter if embedder.loaded.device.type == "cuda" else time.thread_time
    chunk = [rows[i % len(rows)] for i in range(batch)]
    with torch.inference_mode():
        embedder.vectors(chunk, batch, 1 << 20)  # warm
        started = clock()
        for _ in range(passes):
            embedder.vectors(chunk, batch, 1 << 20)
        return (clock() - started) / (passes * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=34, help="requests per send (34: the backlog's average)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the device process's torch threads (1: on a small CPU, a second thread's spinning "
                             "doubles the CPU a tiny model's pass costs, and hides the rest)")
    args = parser.parse_args()
    settings = Settings().model_copy(update={"torch_threads": args.torch_threads})
    if not settings.models.embed:
        raise SystemExit("no embed model in the settings: set INFERQ_MODELS__EMBED")
    alias, entry = next(iter(settings.models.embed.items()))
    embedder = PooledEmbedder.load(alias, entry, pick_device(settings.device))
    rows = embedder.tokenize(_TEXTS)
    device = DeviceProcess(settings, ("embed",), "device_process bench")
    remote = RemoteDevice(device.address, device.authkey, 300.0, device.exitcode)
    pid, key = remote.hello["pid"], f"embed/{alias}"
    try:
        _drive(remote, key, rows, 2000, args.batch)  # warm
        per_request = []
        for round_ in range(args.rounds):
            cpu, batches = _cpu_seconds(pid), _batches(remote, key)
            wall = _drive(remote, key, rows, args.requests, args.batch)
            per_request.append((_cpu_seconds(pid) - cpu) / args.requests)
            print(f"round {round_ + 1}: {args.requests / wall:,.0f} requests/s, device process "
                  f"{per_request[-1] * 1e6:.1f} us of CPU a request, "
                  f"{args.requests / (_batches(remote, key) - batches):.1f} requests a batch")
    finally:
        remote.stop()
        device.close()
    alone = _model_alone(embedder, rows, args.batch)
    print(f"device process: median {statistics.median(per_request) * 1e6:.1f} us a request "
          f"(min {min(per_request) * 1e6:.1f}, max {max(per_request) * 1e6:.1f}); the pass alone at {args.batch} "
          f"a batch: {alone * 1e6:.1f} us a request")


if __name__ == "__main__":
    main()
