"""Soak: 2,000 small tasks through the session worker; every one answered once, every result key carries a
TTL, and the worker's memory stays flat. `bash benchmarks/drills.sh` runs 50,000 (INFERQ_DRILL_SOAK_TASKS)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import redis

from producer.client import Client
from tests.conftest import TaskEvents, WorkerProcess

pytestmark = pytest.mark.integration
TASKS = int(os.environ.get("INFERQ_DRILL_SOAK_TASKS", "2000"))
WINDOW = 256


def status(client: Client, worker: WorkerProcess) -> dict[str, Any]:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[worker.node])
    return dict(replies[0][worker.node])


def test_two_thousand_tasks_leave_memory_flat_and_every_result_expiring(
        client: Client, worker: WorkerProcess, redis_client: redis.Redis) -> None:
    for i in range(200):  # warm: allocator pools, tokenizer caches
        client.embed([f"warm {i}"])
    before = status(client, worker)
    events = TaskEvents(client)  # the worker's task-succeeded events: each task answered once, none twice
    ids: list[str] = []
    in_flight: list[Any] = []
    for i in range(TASKS):
        kind_texts = [f"soak {i} " + "word " * (i % 12)]
        in_flight.append(client.submit_embed(kind_texts) if i % 3 else
                         client.submit_classify(kind_texts, labels=["a", "b", "c"]))
        if len(in_flight) >= WINDOW:
            handle = in_flight.pop(0)
            handle.get()
            ids.append(handle.id)
    for handle in in_flight:
        handle.get()
        ids.append(handle.id)
    after = status(client, worker)
    try:
        deadline = time.monotonic() + 30
        while any(not events.answered_by(task_id) for task_id in ids) and time.monotonic() < deadline:
            time.sleep(0.1)  # the events travel apart from the results
        answers = {task_id: len(events.answered_by(task_id)) for task_id in ids}
    finally:
        events.close()
    assert sorted(set(answers.values())) == [1], {task_id: n for task_id, n in answers.items() if n != 1}
    ttls = [redis_client.ttl(f"celery-task-meta-{task_id}") for task_id in ids]
    assert all(0 < ttl <= client.settings.result_expires for ttl in ttls), sorted(set(ttls))[:5]
    grown = after["rss_mib"] - before["rss_mib"]
    print(f"\nsoak: {TASKS} tasks sent, {len(ids)} answered once each, worker RSS {before['rss_mib']} MiB -> "
          f"{after['rss_mib']} MiB, worker pid unchanged: {after['pid'] == before['pid']}")
    assert grown < 100, f"worker memory grew by {grown:.0f} MiB over {TASKS} tasks"
    assert after["pid"] == before["pid"]
