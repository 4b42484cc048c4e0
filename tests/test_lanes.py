"""Two lanes: bulk messages (priority 9) wait in Redis behind interactive ones (the device's own ordering of
what a worker holds is tested on the batching core, tests/test_batching.py)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from benchmarks.protocol import task_message
from producer.client import Client
from producer.contract import LANE_PRIORITY, queue_keys
from producer.errors import InvalidInput
from producer.settings import Settings
from tests.conftest import REDIS_HOST, ROOT, WorkerProcess, free_port, start_redis_server, stop

pytestmark = pytest.mark.integration
BULK = 600  # single-text messages: about a second and a half of this worker's device time on two cores


def test_the_client_files_bulk_work_in_the_queues_last_list(tmp_path: Path) -> None:
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)  # no worker reads it
    client = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{port}/0"))
    coalescing = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{port}/0", coalesce_ms=1))
    handles: list[Any] = []
    try:
        handles.append(client.submit_embed(["now"]))
        handles.append(client.submit_embed(["later"], priority="bulk"))
        handles.append(client.submit_generate("later", priority="bulk"))
        handles.append(coalescing.submit_classify(["later"], labels=["a", "b"], priority="bulk"))
        deadline = time.monotonic() + 5
        while store.llen(queue_keys("classify")[-1]) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the coalescer sends from its own thread
        lengths = {kind: [store.llen(key) for key in queue_keys(kind)] for kind in ("embed", "classify", "generate")}
        assert lengths == {"embed": [1, 0, 0, 1], "classify": [0, 0, 0, 1], "generate": [0, 0, 0, 1]}
        with pytest.raises(InvalidInput, match="priority must be one of interactive, bulk"):
            client.submit_embed(["x"], priority="urgent")  # type: ignore[arg-type]
    finally:
        coalescing.close()
        client.close()
        handles.clear()
        gc.collect()  # their results let go of their subscriptions while this Redis still answers
        stop(server, 10)


def test_the_cli_sends_one_job_interactive_unless_told_bulk(tmp_path: Path) -> None:
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)  # no worker reads it: the jobs wait
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")},
           "INFERQ_REDIS_URL": f"redis://{REDIS_HOST}:{port}/0", "INFERQ_RESULT_TIMEOUT": "0.5"}
    try:
        for kind, args in (("embed", ["now"]), ("embed", ["later", "--priority", "bulk"]),
                           ("classify", ["later", "--labels", "a,b", "--priority", "bulk"]),
                           ("generate", ["later", "--priority", "bulk"]),
                           ("generate", ["later", "--priority", "bulk", "--stream"])):
            done = subprocess.run([sys.executable, "-m", "producer.cli", kind, *args], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr  # no answer came
        lengths = {kind: [store.llen(key) for key in queue_keys(kind)] for kind in ("embed", "classify", "generate")}
        assert lengths == {"embed": [1, 0, 0, 1], "classify": [0, 0, 0, 1], "generate": [0, 0, 0, 2]}
    finally:
        stop(server, 10)


def test_an_interactive_request_overtakes_queued_bulk_work(client: Client, worker: WorkerProcess) -> None:
    store = redis.Redis.from_url(client.settings.broker)
    backend = redis.Redis.from_url(client.settings.backend)
    bulk = [task_message("inferq.embed", "embed", {"texts": [f"bulk sentence number {i} about lanes"]},
                         priority=LANE_PRIORITY["bulk"]) for i in range(BULK)]
    keys = [f"celery-task-meta-{task_id}" for task_id, _ in bulk]
    try:
        store.lpush(queue_keys("embed")[-1], *(entry for _, entry in bulk))
        deadline = time.monotonic() + 60
        while (answered_at_send := sum(value is not None for value in backend.mget(keys))) == 0:
            assert time.monotonic() < deadline, "no bulk message was answered"
            time.sleep(0.01)  # the worker is busy with them
        interactive = client.submit_embed(["an interactive request"])
        vector = interactive.get(timeout=60)["embeddings"][0]
        answered_before = sum(value is not None for value in backend.mget(keys))
        # In arrival order it would have come after every bulk message still waiting; it ran within about a
        # batch of them (what the worker already held), whatever the machine's speed.
        waiting = BULK - answered_at_send
        assert answered_before - answered_at_send < waiting / 2, \
            f"{answered_before - answered_at_send} of the {waiting} waiting bulk messages were answered first"
        assert len(vector) == 384
        deadline = time.monotonic() + 120
        while sum(value is not None for value in backend.mget(keys)) < BULK:  # none of the bulk work is lost
            assert time.monotonic() < deadline, "the bulk messages were not all answered"
            time.sleep(0.1)
        assert all(b'"SUCCESS"' in value for value in backend.mget(keys))
    finally:
        # a failure must not leave the session worker bulk work that later tests would count
        store.delete(queue_keys("embed")[-1])
        deadline = time.monotonic() + 60
        while store.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.1)
        backend.delete(*keys)
