"""What a hand-off between a receiver and its device process costs, per request, by channel.

    python -m benchmarks.handoff [--batches 400] [--batch 128] [--dim 384]

Each round trip sends what a receiver sends for a batch of single-text embed requests (a tuple per
request, with ~12 token ids) and gets back what the device process answers (a float32 row of ``dim``
per request). The far side does no model work, so the figures are the channel alone: wall time and
CPU of both processes per request. Channels: ``multiprocessing.connection`` over a Unix socket, one
send per batch (what inferq uses); the same, one send per request; and ``multiprocessing.Queue``, one
put per batch.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import numpy as np

KEY = b"handoff-bench"


def _requests(batch: int) -> list[tuple[Any, ...]]:
    return [(i, "embed/minilm", [[101, *range(2000, 2010), 102]], 1, 12, 30.0) for i in range(batch)]


def _answers(requests: list[tuple[Any, ...]], dim: int) -> list[tuple[int, bool, Any]]:
    rows = np.zeros((len(requests), dim), dtype=np.float32)
    return [(request[0], True, rows[i]) for i, request in enumerate(requests)]


def _socket_server(address: str, dim: int, per_request: bool, ready: Any) -> None:
    with Listener(address, "AF_UNIX", authkey=KEY) as listener:
        ready.set()
        conn = listener.accept()
        while True:
            message = conn.recv()
            if message is None:
                conn.send(time.process_time())
                return
            conn.send(_answers([message] if per_request else message, dim))


def _queue_server(inbox: Any, outbox: Any, dim: int) -> None:
    while True:
        message = inbox.get()
        if message is None:
            outbox.put(time.process_time())
            return
        outbox.put(_answers(message, dim))


def _timed(batches: int, round_trip: Callable[[], None]) -> tuple[float, float]:
    """Wall time and this process's CPU for ``batches`` round trips."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        round_trip()
    return time.perf_counter() - wall, time.process_time() - cpu


def _socket(batches: int, batch: int, dim: int, per_request: bool) -> tuple[float, float, float]:
    address = os.path.join(tempfile.mkdtemp(prefix="handoff-"), "s.sock")
    context = mp.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_socket_server, args=(address, dim, per_request, ready))
    child.start()
    ready.wait()
    conn: Connection = Client(address, "AF_UNIX", authkey=KEY)
    requests = _requests(batch)

    def round_trip() -> None:
        if per_request:
            for request in requests:
                conn.send(request)
            for _ in requests:
                conn.recv()
        else:
            conn.send(requests)
            conn.recv()

    wall, cpu = _timed(batches, round_trip)
    conn.send(None)
    child_cpu = conn.recv()
    child.join()
    return wall, cpu, child_cpu


def _queue(batches: int, batch: int, dim: int) -> tuple[float, float, float]:
    context = mp.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(target=_queue_server, args=(inbox, outbox, dim))
    child.start()
    requests = _requests(batch)
    inbox.put(requests)
    outbox.get()  # the child is up

    def round_trip() -> None:
        inbox.put(requests)
        outbox.get()

    wall, cpu = _timed(batches, round_trip)
    inbox.put(None)
    child_cpu = outbox.get()
    child.join()
    return wall, cpu, child_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    total = args.batches * args.batch
    print(f"{args.batches} round trips of {args.batch} requests, {args.dim}-float rows back")
    print(f"{'channel':42} {'wall us/req':>12} {'sender us/req':>14} {'far side us/req':>16}")
    runs: dict[str, Callable[[], tuple[float, float, float]]] = {
        "connection (Unix socket), a send per batch": lambda: _socket(args.batches, args.batch, args.dim, False),
        "connection (Unix socket), a send per request": lambda: _socket(args.batches, args.batch, args.dim, True),
        "multiprocessing.Queue, a put per batch": lambda: _queue(args.batches, args.batch, args.dim),
    }
    for name, run in runs.items():
        wall, cpu, child_cpu = run()
        # the far side's CPU includes its start-up (imports); it is small against the loop but not zero
        print(f"{name:42} {wall / total * 1e6:12.1f} {cpu / total * 1e6:14.1f} {child_cpu / total * 1e6:16.1f}")


if __name__ == "__main__":
    main()
