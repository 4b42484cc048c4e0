"""``inferq bench --client raw --backlog N``: N single-text messages pushed at once, and the workers timed as
they drain them.

The messages are built before the clock starts (``benchmarks/protocol.py``: what a Celery 5 client sends) and
LPUSHed in pipelines of 1,000, so the client costs the workers almost nothing. The clock runs from the first
push to the last result stored. What it reports per message: the CPU of every worker process (each worker's
whole process tree, read from /proc before and after, so a device process or receivers are counted) and of
Redis (``INFO cpu``), with the task-succeeded events counted on their Redis channel, since a worker that
skipped them would look faster than it is.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import redis

from benchmarks.protocol import task_message
from producer.contract import queue_name, task_name
from producer.settings import Kind, Settings

PUSH_CHUNK = 1000
RESULT_PREFIX = "celery-task-meta-"
TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu(stat: Path) -> float | None:
    """User + system CPU seconds from a /proc ``stat`` file (a process's or a thread's); None once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def process_cpu(pid: int) -> float | None:
    return stat_cpu(Path(f"/proc/{pid}/stat"))


def descendants(roots: Iterable[int]) -> dict[int, int]:
    """Every live process under ``roots`` (roots included): pid -> the root it belongs to."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree = {root: root for root in roots}
    grown = True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if pid not in tree and parent in tree:
                tree[pid] = tree[parent]
                grown = True
    return tree


def cpu_by_process(roots: Iterable[int]) -> dict[int, float]:
    tree = descendants(roots)
    return {pid: cpu for pid in tree if (cpu := process_cpu(pid)) is not None}


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Subscriber:
    """A thread that hands each message of the channels matching ``pattern`` to ``heard``."""

    def __init__(self, url: str, pattern: str) -> None:
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        self._pubsub.psubscribe(pattern)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def heard(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None:
                self.heard(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()


class SucceededCounter(Subscriber):
    """Counts task-succeeded events as Flower would receive them: on the events exchange's Redis channels,
    one event a message or (Celery's buffered dispatcher) many in one ``task.multi`` message."""

    def __init__(self, url: str) -> None:
        self.count = 0
        self.all_events = 0  # every task event, of any type
        # "/<db>.celeryev/task.succeeded" with Celery's default fanout prefix, "celeryev/..." without one
        super().__init__(url, "*celeryev/task.*")

    def heard(self, message: dict[str, Any]) -> None:
        envelope = orjson.loads(message["data"])
        events = orjson.loads(base64.b64decode(envelope["body"]))
        for event in events if isinstance(events, list) else [events]:
            self.count += event.get("type") == "task-succeeded"
            self.all_events += 1


def run_backlog(settings: Settings, kind: Kind, count: int, worker_pids: list[int],
                timeout: float = 1800.0) -> dict[str, Any]:
    """Push ``count`` messages of ``kind`` and time the workers (``worker_pids``, with their trees) draining them."""
    broker = redis.Redis.from_url(settings.broker)
    backend = redis.Redis.from_url(settings.backend)
    name, queue = task_name(kind), queue_name(kind)
    text = "a short sentence about queues, batching and GPUs"
    payload = ({"texts": [text]} if kind == "embed" else
               {"texts": [text], "labels": ["sports", "finance", "cooking"]} if kind == "classify" else
               {"prompt": "Once upon a time", "max_new_tokens": 16})
    messages = [task_message(name, queue, payload) for _ in range(count)]
    keys = [RESULT_PREFIX + task_id for task_id, _ in messages]
    events = SucceededCounter(settings.broker)
    time.sleep(0.5)  # the subscription is in place before the first event
    cpu_before = cpu_by_process(worker_pids)
    redis_before = redis_cpu(broker)
    started = time.perf_counter()
    for at in range(0, count, PUSH_CHUNK):
        broker.lpush(queue, *(entry for _, entry in messages[at:at + PUSH_CHUNK]))
    pushed = time.perf_counter() - started
    waiting = wait_for(backend, keys, started + timeout)
    drained = time.perf_counter() - started
    cpu_after = cpu_by_process(worker_pids)
    redis_after = redis_cpu(broker)
    time.sleep(0.5)  # the last events (flushed every 50 ms) arrive
    events.close()
    statuses = _statuses(backend, keys)
    per_process = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
    worker_cpu = sum(per_process.values())
    for at in range(0, len(keys), 1000):
        backend.delete(*keys[at:at + 1000])
    return {
        "kind": kind, "messages": count, "unanswered": waiting, "succeeded": statuses.get("SUCCESS", 0),
        "failed": statuses.get("FAILURE", 0), "task_succeeded_events": events.count,
        "push_s": round(pushed, 3), "drain_s": round(drained, 3), "messages_per_s": round(count / drained, 1),
        "worker_cpu_s": round(worker_cpu, 2), "worker_cpu_us_per_message": round(worker_cpu / count * 1e6, 1),
        "worker_cpu_us_per_message_by_process": {str(pid): round(cpu / count * 1e6, 1)
                                                  for pid, cpu in sorted(per_process.items()) if cpu > 0},
        "redis_cpu_us_per_message": round((redis_after - redis_before) / count * 1e6, 1),
        "worker_cores_busy": round(worker_cpu / drained, 2),
    }


def wait_for(backend: redis.Redis, keys: list[str], deadline: float) -> int:
    """Waits until every key exists (or the deadline); how many never appeared. Results land roughly in the
    order sent, so each look reads the oldest missing keys and stops at the first chunk with none stored:
    a look costs Redis about what landed since the last one, not the whole backlog."""
    missing = list(keys)
    while missing and time.perf_counter() < deadline:
        still: list[str] = []
        for at in range(0, len(missing), 500):
            chunk = missing[at:at + 500]
            with backend.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.exists(key)
                present = pipe.execute()
            left = [key for key, here in zip(chunk, present, strict=True) if not here]
            still += left
            if len(left) == len(chunk):  # none of this chunk yet, so most likely none of what follows
                still += missing[at + 500:]
                break
        missing = still
        if missing:
            time.sleep(0.05)
    return len(missing)


def _statuses(backend: redis.Redis, keys: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for at in range(0, len(keys), 1000):
        for raw in backend.mget(keys[at:at + 1000]):
            status = orjson.loads(raw)["status"] if raw is not None else "MISSING"
            counts[status] = counts.get(status, 0) + 1
    return counts
