"""``python -m benchmarks.herd``: what a message costs when many receivers wait on one queue.

An idle receiver waits for news of its queues (``workers/receiving/waiting.py``). Where every waiting
receiver is told of every message and all of them go to take it (the first version of that wait), the cost
of a message grows with the number of receivers waiting, however light the load: Redis runs a take per
receiver, and each receiver's process wakes. This bench starts ``inferq worker --gpus none --receivers N
--kinds embed`` with the tiny embedder for each N, sends single-text embeds at a steady rate (raw protocol-2
messages, one LPUSH each, so nothing waits long enough to batch), and reports per message: the CPU of every
worker process, Redis's CPU and commands, and the time from the push to the result's publication (the
client subscribes to the result channels, as a waiting Celery client does).

    python -m benchmarks.herd --receivers 1,4,8 --messages 600 --rate 100 --model /tmp/tiny/bert

Each N also gets an idle spell of the same length first: its CPU is what the receivers cost while nothing
arrives (each waits a second at a time, then takes, which finds a dead connection), reported per second.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.backlog import RESULT_PREFIX, Subscriber, cpu_by_process, redis_cpu, wait_for
from benchmarks.bench import machine, percentile, start_worker, wait_ready
from benchmarks.protocol import task_message
from producer.client import Client
from producer.contract import queue_name, task_name
from producer.settings import Settings


def redis_commands(client: redis.Redis) -> int:
    return sum(int(stats["calls"]) for stats in client.info("commandstats").values())


@dataclass(frozen=True)
class Usage:
    """CPU seconds of the worker processes (by pid) and of Redis, and Redis's commands, at one moment; or, from
    ``since``, what was spent between two such moments."""

    worker: dict[int, float]
    redis_cpu: float
    commands: int

    @classmethod
    def of(cls, pids: list[int], broker: redis.Redis) -> Usage:
        return cls(cpu_by_process(pids), redis_cpu(broker), redis_commands(broker))

    def since(self, before: Usage) -> Usage:
        spent = {pid: cpu - before.worker.get(pid, 0.0) for pid, cpu in self.worker.items()}
        return Usage(spent, self.redis_cpu - before.redis_cpu, self.commands - before.commands)

    @property
    def worker_cpu(self) -> float:
        return sum(self.worker.values())


class Arrivals(Subscriber):
    """When each result was published, as a client subscribed to its channel hears it."""

    def __init__(self, url: str) -> None:
        self.at: dict[str, float] = {}
        super().__init__(url, RESULT_PREFIX + "*")

    def heard(self, message: dict[str, Any]) -> None:
        self.at.setdefault(message["channel"].decode()[len(RESULT_PREFIX):], time.perf_counter())


def measure(settings: Settings, pids: list[int], messages: int, rate: float) -> dict[str, Any]:
    broker = redis.Redis.from_url(settings.broker)
    backend = redis.Redis.from_url(settings.backend)
    queue = queue_name("embed")
    built = [task_message(task_name("embed"), queue, {"texts": [f"message {n} about queues"]})
             for n in range(messages)]
    arrivals = Arrivals(settings.backend)
    time.sleep(0.5)  # subscribed before the first result
    spell = messages / rate

    before = Usage.of(pids, broker)
    time.sleep(spell)
    idle = Usage.of(pids, broker).since(before)
    idle_rates = {"worker_cpu_ms_per_s": idle.worker_cpu / spell * 1e3,
                  "redis_cpu_ms_per_s": idle.redis_cpu / spell * 1e3, "redis_commands_per_s": idle.commands / spell}

    sent: dict[str, float] = {}
    before = Usage.of(pids, broker)
    started = time.perf_counter()
    for n, (task_id, entry) in enumerate(built):
        pause = started + n / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        sent[task_id] = time.perf_counter()
        broker.lpush(queue, entry)
    unanswered = wait_for(backend, [RESULT_PREFIX + task_id for task_id in sent], time.perf_counter() + 120)
    used = Usage.of(pids, broker).since(before)
    time.sleep(0.3)
    arrivals.close()
    backend.delete(*(RESULT_PREFIX + task_id for task_id in sent))
    latencies = [(arrivals.at[task_id] - at) * 1e3 for task_id, at in sent.items() if task_id in arrivals.at]
    return {
        "messages": messages, "rate": rate, "unanswered": unanswered,
        "worker_cpu_us_per_message": used.worker_cpu / messages * 1e6,
        "redis_cpu_us_per_message": used.redis_cpu / messages * 1e6,
        "redis_commands_per_message": used.commands / messages,
        "latency_ms_p50": percentile(latencies, 50), "latency_ms_p95": percentile(latencies, 95),
        "idle": idle_rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receivers", default="1,4,8", help="comma-separated receiver counts")
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--rate", type=float, default=100.0, help="messages a second")
    parser.add_argument("--model", default="/tmp/tiny/bert", help="the embedder every worker loads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ["INFERQ_MODELS__EMBED"] = json.dumps({"tiny": {"source": args.model}})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings()
    client = Client(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
    print(f"{report['machine']}; {args.messages} single-text embeds at {args.rate:g}/s")
    print(f"{'receivers':>9}{'worker us/msg':>15}{'redis us/msg':>14}{'cmds/msg':>10}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'idle worker ms/s':>18}{'idle redis ms/s':>17}{'idle cmds/s':>13}{'lost':>6}")
    for receivers in [int(n) for n in args.receivers.split(",")]:
        worker = start_worker(args.out / "herd-worker.log",
                              ["--gpus", "none", "--receivers", str(receivers), "--kinds", "embed"])
        try:
            wait_ready(client, worker)
            row = measure(settings, [worker.pid], args.messages, args.rate)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        report["runs"][str(receivers)] = row
        print(f"{receivers:>9}{row['worker_cpu_us_per_message']:>15.0f}{row['redis_cpu_us_per_message']:>14.0f}"
              f"{row['redis_commands_per_message']:>10.1f}{row['latency_ms_p50']:>8.1f}{row['latency_ms_p95']:>8.1f}"
              f"{row['idle']['worker_cpu_ms_per_s']:>18.1f}{row['idle']['redis_cpu_ms_per_s']:>17.1f}"
              f"{row['idle']['redis_commands_per_s']:>13.1f}"
              f"{row['unanswered']:>6}")
    client.close()
    (args.out / f"herd-{socket.gethostname()}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
