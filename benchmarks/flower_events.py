"""How many task events per second `inferq flower` takes in before it falls behind.

    python -m benchmarks.flower_events --backlog 20000 --worker-args "--gpus none --receivers 2 --kinds embed"

Starts `inferq flower` and the workers on INFERQ_REDIS_URL with the current settings, pushes a backlog of
single-text embed messages (``benchmarks/protocol.py``), and while the workers drain it reads Flower's
``flower_events_total`` (all types summed) from its /metrics every 0.25 s. It counts the events the
workers published on the events channel itself. Prints: events sent and their rate over the drain, what
Flower had counted when the drain ended, how long after that it caught up (or how many it never
counted), the fastest rate Flower counted over one second, and Flower's CPU per event.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

from benchmarks.backlog import PUSH_CHUNK, RESULT_PREFIX, SucceededCounter, process_cpu, wait_for
from benchmarks.bench import wait_ready
from benchmarks.protocol import task_message
from producer.client import Client
from producer.settings import Settings


def flower_events(port: int) -> float | None:
    """The sum of flower_events_total over its labels; None while Flower does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("flower_events_total{"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("--worker-args", default="--gpus none --receivers 2 --kinds embed")
    parser.add_argument("--catch-up", type=float, default=60.0, help="seconds to wait for Flower after the drain")
    args = parser.parse_args()
    settings = Settings()
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="flower-events-"))
    flower = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", "--port", str(port)],
                              stdout=(logs / "flower.log").open("wb"), stderr=subprocess.STDOUT)
    workers = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", *shlex.split(args.worker_args)],
                               stdout=(logs / "workers.log").open("wb"), stderr=subprocess.STDOUT)
    client = Client(settings)
    broker, backend = redis.Redis.from_url(settings.broker), redis.Redis.from_url(settings.backend)
    try:
        wait_ready(client, workers)
        while flower_events(port) is None:
            time.sleep(0.5)
        time.sleep(3)  # Flower has seen the workers' heartbeats and settled
        messages = [task_message("inferq.embed", "embed", {"texts": [f"flower event {i}"]})
                    for i in range(args.backlog)]
        keys = [RESULT_PREFIX + task_id for task_id, _ in messages]
        sent = SucceededCounter(settings.broker)
        time.sleep(0.5)
        flower_before, flower_cpu = flower_events(port) or 0.0, process_cpu(flower.pid) or 0.0
        samples: list[tuple[float, float]] = []
        started = time.perf_counter()
        for at in range(0, len(messages), PUSH_CHUNK):
            broker.lpush("embed", *(entry for _, entry in messages[at:at + PUSH_CHUNK]))
        deadline = started + 600
        missing = len(keys)
        while missing and time.perf_counter() < deadline:
            missing = wait_for(backend, keys, time.perf_counter() + 0.25)
            samples.append((time.perf_counter() - started, (flower_events(port) or 0.0) - flower_before))
        drained = time.perf_counter() - started
        time.sleep(0.3)  # the workers' last events (flushed every 50 ms)
        at_drain = samples[-1][1]
        caught_up = None
        while time.perf_counter() - started - drained < args.catch_up:
            counted = (flower_events(port) or 0.0) - flower_before
            samples.append((time.perf_counter() - started, counted))
            if counted >= sent.all_events:
                caught_up = samples[-1][0] - drained
                break
            time.sleep(0.25)
        flower_cpu = (process_cpu(flower.pid) or 0.0) - flower_cpu
        sent.close()
        fastest = max(((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[4:], strict=False)
                       if b[0] > a[0]), default=0.0)
        counted = samples[-1][1]
        print(f"{args.backlog} messages, workers: {args.worker_args}; unanswered {missing}")
        print(f"events sent {sent.all_events} ({sent.all_events / drained:.0f}/s over the {drained:.1f} s drain); "
              f"Flower had counted {at_drain:.0f} when the drain ended")
        print(f"Flower counted {counted:.0f} in all; caught up "
              + (f"{caught_up:.1f} s after the drain" if caught_up is not None else
                 f"never within {args.catch_up:g} s ({sent.all_events - counted:.0f} not counted)"))
        print(f"fastest Flower count over ~1 s: {fastest:.0f} events/s; Flower CPU {flower_cpu:.1f} s, "
              f"{flower_cpu / max(counted, 1) * 1e6:.0f} us per event counted")
        for at in range(0, len(keys), 1000):
            backend.delete(*keys[at:at + 1000])
    finally:
        workers.terminate()
        flower.terminate()
        workers.wait(timeout=120)
        flower.wait(timeout=30)
        client.close()


if __name__ == "__main__":
    main()
