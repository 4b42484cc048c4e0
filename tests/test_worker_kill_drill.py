"""The worker-kill drill with the default settings: 3,000 single-text embed tasks in flight across two
workers, one SIGKILLed while it holds work. Every task gets exactly one result, the right one; the producer
sees no error; the messages the dead worker held are answered by the live one within 3 minutes, after the
default visibility timeout (150 s) and Kombu's restore sweep, both measured here.

It runs about three minutes, most of it waiting out the visibility timeout, as production would.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client, Handle
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, TaskEvents, WorkerProcess, unacked, whereabouts_report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
DB = 14
SENT = 3000
DEADLINE = 180.0  # the bound: held work is answered by a live worker within 3 minutes


def test_a_worker_killed_mid_load_with_the_default_settings(tmp_path: Path) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    defaults = Settings(redis_url=url)
    assert defaults.visibility_timeout == 150  # the drill is about the defaults: no config file at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_REDIS_URL=url, HF_HUB_OFFLINE="1")
    pid = os.getpid()
    doomed = WorkerProcess(env, ARTIFACTS / "drill-doomed.log", f"doomed-{pid}@localhost", ("--kinds", "embed"))
    survivor = WorkerProcess(env, ARTIFACTS / "drill-survivor.log", f"survivor-{pid}@localhost",
                             ("--kinds", "embed"))
    client = Client(Settings(redis_url=url, result_timeout=DEADLINE + 60))
    events: TaskEvents | None = None
    try:
        doomed.wait_ready(client)
        survivor_pid = survivor.wait_ready(client)["pid"]
        events = TaskEvents(client)
        texts = [f"drill request {i}: the quick brown fox jumps over the lazy dog" for i in range(SENT)]
        handles: list[Handle[Any]] = [client.submit_embed([text]) for text in texts]
        deadline = time.monotonic() + 120
        while events.from_worker(doomed.node) < 200:  # mid-load: it has answered some and holds more
            assert time.monotonic() < deadline, doomed.log()[-2000:]
            time.sleep(0.05)
        doomed.process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        doomed.process.wait(timeout=10)
        at_kill = unacked(store)
        # The survivor acknowledges what it holds within seconds; what is still unacknowledged after it went
        # through the queue is what the dead worker held.
        settle = time.monotonic() + 90
        while store.llen("embed") or unacked(store).keys() - at_kill.keys():
            assert time.monotonic() < settle, survivor.log()[-2000:]
            time.sleep(0.2)
        # it finishes what it held at the kill: what is left unacknowledged is what the dead worker received
        while survivors := [tag for tag in unacked(store).keys() & at_kill.keys()
                            if survivor.node in events.received_by(at_kill[tag][0])]:
            assert time.monotonic() < settle, (survivors, survivor.log()[-2000:])
            time.sleep(0.2)
        held = {tag: at_kill[tag] for tag in unacked(store).keys() & at_kill.keys()}
        assert held, "the killed worker held no unacknowledged work; nothing was tested"
        held_ids = {task_id for task_id, _ in held.values()}
        expires_at = max(delivered for _, delivered in held.values()) + defaults.visibility_timeout
        while unacked(store).keys() & held.keys():  # Kombu's sweep puts them back on the queue
            assert time.time() < killed_at + DEADLINE, \
                f"held messages were never restored; {whereabouts_report(store, list(held_ids), ('embed',))}"
            time.sleep(0.2)
        restored_at = time.time()

        keys = [f"celery-task-meta-{handle.id}" for handle in handles]
        while sum(raw is not None for raw in store.mget(keys)) < SENT:  # or report where the missing ones are
            assert time.time() < killed_at + DEADLINE, \
                whereabouts_report(store, [handle.id for handle in handles], ("embed",))
            time.sleep(0.2)
        answers = [handle.get() for handle in handles]  # any error here fails the drill
        answered_at = time.time()
        assert [answer["dim"] for answer in answers] == [384] * SENT
        # exactly one result each, and for the redelivered ones the right one: the same as asked afresh
        by_id = {handle.id: (text, answer) for handle, text, answer in zip(handles, texts, answers, strict=True)}
        for task_id in held_ids:
            text, answer = by_id[task_id]
            again = client.embed([text])["embeddings"][0]
            assert max(abs(a - b) for a, b in zip(answer["embeddings"][0], again, strict=True)) < 1e-4
        stored = [json.loads(raw) for raw in store.mget(keys)]
        assert [meta["status"] for meta in stored] == ["SUCCESS"] * SENT

        status = client.app.control.broadcast("inferq_status", reply=True, timeout=2.0,
                                              destination=[survivor.node])[0][survivor.node]
        assert status["pid"] == survivor_pid and survivor.process.poll() is None  # no restart, no crash
        twice = sum(1 for count in events.per_task.values() if count > 1)
        report = (f"\nworker-kill drill (defaults: visibility {defaults.visibility_timeout:g} s): {SENT} sent, "
                  f"{SENT} answered, 0 lost; the dead worker held {len(held)} unacknowledged messages; "
                  f"redelivered {status['redelivered']}, of which {status['already_answered']} were already "
                  f"answered (not run again); task ids with two task-succeeded events: {twice}\n"
                  f"  kill -> visibility expired: {expires_at - killed_at:.1f} s; expired -> restored by the "
                  f"sweep: {restored_at - expires_at:.1f} s; restored -> all answered: "
                  f"{answered_at - restored_at:.1f} s; kill -> all answered: {answered_at - killed_at:.1f} s")
        print(report)
        (ARTIFACTS / "worker-kill-drill.txt").write_text(report.strip() + "\n")
        assert status["redelivered"] >= len(held)
        assert answered_at - killed_at < DEADLINE
    finally:
        if events is not None:
            events.close()
        doomed.stop()
        survivor.stop()
        client.close()
        store.flushdb()
        store.close()
