"""A worker killed (SIGKILL) while it holds a batch's messages loses nothing: late acknowledgement puts
them back, and another worker answers every one. And a worker killed while it takes messages off the queue
loses none either: each is on the queue or recorded as unacknowledged at every moment."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from benchmarks.protocol import task_message
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, WorkerProcess, whereabouts, whereabouts_report, worker_env

pytestmark = pytest.mark.integration
DB = 14  # its own database: the session worker must not take these messages


def test_messages_held_by_a_killed_worker_are_answered_by_another(tmp_path: Path,
                                                                   tiny_models: dict[str, Path]) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text(f"""
visibility_timeout = 6
worker_concurrency = 16
[time_limits]
embed = 5
classify = 5
generate = 5
[batching]
generate_max_prompts = 2
[models.generate.tiny-lm]
source = {json.dumps(str(tiny_models["lm"]))}
max_length = 128
""")
    env = worker_env(config, url)
    sender = Celery("foreign", broker=url, backend=url, set_as_current=False)
    first = WorkerProcess(env, ARTIFACTS / "killed-worker.log", f"doomed-{os.getpid()}@localhost",
                          ("--kinds", "generate"))
    second: WorkerProcess | None = None
    try:
        ids = [sender.send_task("inferq.generate", kwargs={"prompt": f"hello {i}", "max_new_tokens": 120},
                                queue="generate").id for i in range(80)]
        keys = [f"celery-task-meta-{task_id}" for task_id in ids]
        deadline = time.monotonic() + 120
        while sum(v is not None for v in store.mget(keys)) < 10:  # the first worker is mid-way through
            assert time.monotonic() < deadline, first.log()[-2000:]
            time.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        answered_before = sum(v is not None for v in store.mget(keys))
        assert answered_before < 80, "the worker finished everything before it was killed; nothing was tested"
        held = store.hlen("unacked")
        assert held > 0  # it died holding delivered, unacknowledged messages
        killed_at = time.monotonic()
        second = WorkerProcess(env, ARTIFACTS / "rescuer-worker.log", f"rescuer-{os.getpid()}@localhost",
                               ("--kinds", "generate"))
        while sum(v is not None for v in store.mget(keys)) < 80:
            assert time.monotonic() - killed_at < 90, (f"results missing; held={held}; "
                                                       f"{whereabouts_report(store, ids, ('generate',))}\n"
                                                       f"{second.log()[-2000:]}")
            time.sleep(0.2)
        results = [json.loads(v) for v in store.mget(keys) if v is not None]
        failures = [r["result"] for r in results if r["status"] != "SUCCESS"]
        assert not failures, f"{len(failures)} of 80 failed, e.g. {failures[:3]}"
        assert all(r["result"]["model"] == "tiny-lm" for r in results)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        sender.close()
        store.flushdb()
        store.close()


def test_workers_killed_while_taking_messages_lose_none(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """SIGKILL lands while a busy worker takes its next messages off the queue (it takes a batch every few
    milliseconds under a backlog). Kombu popped messages and recorded them as unacknowledged in a second
    round trip: a kill between the two lost up to 128 messages (3 kills in 8 lost some, in our reproduction).
    Here every message must be answered, queued or recorded right after each kill, and a last worker
    answers all of them, each with its own result."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    # Six kills in half a minute, none caused by a message: the poison quarantine rightly counts the
    # redelivered message running alone at each kill against it, and with the default max_deliveries (3)
    # one counted at two kills is buried (in 4 runs here 0-2 messages a run were counted at two kills; a
    # CI run buried one). Ten deliveries is more than six kills can give any message.
    config.write_text(f"""
visibility_timeout = 4
max_deliveries = 10
[time_limits]
embed = 3
classify = 3
generate = 3
[models.embed.tiny]
source = {json.dumps(str(tiny_models["classifier"]))}
max_length = 64
""")
    env = worker_env(config, url)
    messages = [task_message("inferq.embed", "embed", {"texts": [f"taken {i}"]}) for i in range(6000)]
    ids = [task_id for task_id, _ in messages]
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    store.lpush("embed", *(entry for _, entry in messages))
    last: WorkerProcess | None = None
    doomed: WorkerProcess | None = None
    try:
        for kill in range(6):
            doomed = WorkerProcess(env, ARTIFACTS / f"taking-{kill}.log", f"taking-{kill}-{os.getpid()}@localhost",
                                   ("--kinds", "embed"))
            before = sum(v is not None for v in store.mget(keys))
            deadline = time.monotonic() + 120
            while sum(v is not None for v in store.mget(keys)) < before + 300:  # busy, mid-backlog
                assert doomed.process.poll() is None and time.monotonic() < deadline, doomed.log()[-2000:]
                time.sleep(0.01)
            # The moment it acknowledges a batch, room frees and it takes the next messages: kill it there.
            # (The first drop in its unacknowledged count; waiting for a new lowest count instead could last
            # until the backlog ran out, and leave nothing for the next worker to take.)
            previous = store.zcard("unacked_index")
            while (current := store.zcard("unacked_index")) >= previous:
                previous = current
                assert time.monotonic() < deadline, doomed.log()[-2000:]
            time.sleep(kill * 0.0005)
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            doomed.stop()
            assert store.llen("embed"), f"kill {kill}: the backlog ran out before the kill; nothing was tested"
            places = whereabouts(store, ids, ("embed",))
            gone = [task_id for task_id, place in places.items() if place == "gone"]
            assert not gone, f"kill {kill}: {len(gone)} messages lost: {whereabouts_report(store, ids, ('embed',))}"
        last = WorkerProcess(env, ARTIFACTS / "taking-last.log", f"taking-last-{os.getpid()}@localhost",
                             ("--kinds", "embed"))
        deadline = time.monotonic() + 150
        while sum(v is not None for v in store.mget(keys)) < len(ids):
            assert time.monotonic() < deadline, (f"{whereabouts_report(store, ids, ('embed',))}\n"
                                                 f"{last.log()[-2000:]}")
            time.sleep(0.2)
        results = [json.loads(v) for v in store.mget(keys)]
        failures = [r["result"] for r in results if r["status"] != "SUCCESS"]
        assert not failures, f"{len(failures)} failed, e.g. {failures[:3]}"
        # each its own answer: the same text always gets the same vector, different texts different ones
        assert len({tuple(r["result"]["embeddings"][0]) for r in results}) == len(ids)
    finally:
        for worker in (doomed, last):  # a failed assertion must not leave a worker on this database
            if worker is not None:
                worker.stop()
        store.flushdb()
        store.close()
