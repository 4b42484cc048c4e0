"""Messages that are not valid inferq tasks: never run, never crash the worker, counted, logged, and
answered with InvalidMessage under their task id where it can be read."""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from tests.conftest import WorkerProcess
from tests.test_foreign_clients import raw_message, stored
from workers.receiving.dead_letter import DEAD_LETTER_KEY

pytestmark = pytest.mark.integration


class WritesAFile:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def refused(client: Client, worker: WorkerProcess) -> dict[str, int]:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[worker.node])
    return dict(replies[0][worker.node]["refused"])


def test_a_pickled_payload_is_refused_without_being_unpickled(redis_client: redis.Redis, client: Client,
                                                               worker: WorkerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    before = refused(client, worker).get("undecodable", 0)
    for queue in ("embed", "classify", "generate"):
        task_id, message = raw_message(f"inferq.{queue}", {}, content_type="application/x-python-serialize")
        message["body"] = base64.b64encode(pickle.dumps(((), {"texts": [WritesAFile(marker)]}, {}))).decode()
        message["content-encoding"] = "binary"
        redis_client.lpush(queue, json.dumps(message))
        meta = stored(redis_client, task_id)
        assert meta["status"] == "FAILURE"
        assert meta["result"]["exc_type"] == "InvalidMessage"
        assert "inferq accepts only JSON task messages (content type 'application/x-python-serialize')" in \
            meta["result"]["exc_message"]
    assert not marker.exists(), "a pickled payload was unpickled"
    assert refused(client, worker)["undecodable"] == before + 3
    assert client.embed(["still serving"])["dim"] == 384


@pytest.mark.parametrize(("body", "content_type"), [
    (b"{not json", "application/json"),
    (b"\xff\xfe\xfa invalid utf-8", "application/json"),
    (b"- yaml: [1, 2]", "application/x-yaml"),
])
def test_undecodable_bodies_fail_with_invalid_message(redis_client: redis.Redis, client: Client,
                                                      worker: WorkerProcess, body: bytes, content_type: str) -> None:
    task_id, message = raw_message("inferq.embed", {}, content_type=content_type)
    message["body"] = base64.b64encode(body).decode()
    redis_client.lpush("embed", json.dumps(message))
    meta = stored(redis_client, task_id)
    assert meta["result"]["exc_type"] == "InvalidMessage", meta
    assert "could not be decoded" in meta["result"]["exc_message"]
    assert client.embed(["still serving"])["dim"] == 384


def test_a_body_that_is_not_a_task_triple_fails_with_invalid_message(redis_client: redis.Redis, client: Client,
                                                                     worker: WorkerProcess) -> None:
    task_id, message = raw_message("inferq.embed", {})
    message["body"] = base64.b64encode(json.dumps("just a string").encode()).decode()
    redis_client.lpush("embed", json.dumps(message))
    meta = stored(redis_client, task_id)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "InvalidMessage", meta
    assert client.embed(["still serving"])["dim"] == 384


@pytest.mark.parametrize("path", ["fast", "celery"])
def test_a_triple_of_the_wrong_shapes_fails_with_invalid_message_on_either_path(
        redis_client: redis.Redis, client: Client, worker: WorkerProcess, path: str) -> None:
    """Celery's own path (a redelivered message, one with an eta) acknowledged some of these unanswered, and
    failed others in the pool where nothing was stored or acknowledged, so they came back forever."""
    bodies: list[tuple[str, Any]] = [
        ("kwargs are JSON list, not an object", [[], ["x"], {}]),
        ("kwargs are JSON string, not an object", [[], "abc", {}]),
        ("args are JSON int, not a list", [7, {"texts": ["x"]}, {}]),
        ("embed is JSON string, not an object or null", [[], {"texts": ["x"]}, "x"]),
        ("the body is JSON list of 2", [[], {"texts": ["x"]}]),
        # Celery would unpack an object of three keys as the triple, and fail in the pool unanswered
        ("the body is a JSON object without 'args'", {"a": 1, "b": 2, "c": 3}),
        ("kwargs are JSON list, not an object", {"args": [], "kwargs": ["x"]})]  # a protocol-1 body
    sent = {}
    for says, body in bodies:
        task_id, message = raw_message("inferq.embed", {})
        message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
        if path == "celery":
            message["properties"]["delivery_info"]["redelivered"] = True  # as Kombu marks a restored one
        redis_client.lpush("embed", json.dumps(message))
        sent[task_id] = says
    for task_id, says in sent.items():
        meta = stored(redis_client, task_id)
        assert meta["result"]["exc_type"] == "InvalidMessage", meta
        assert says in meta["result"]["exc_message"], meta
    # a kwarg named like the task's own first parameter is an unknown argument, not a TypeError
    task_id, message = raw_message("inferq.embed", {"texts": ["x"], "task": 1})
    if path == "celery":
        message["properties"]["delivery_info"]["redelivered"] = True
    redis_client.lpush("embed", json.dumps(message))
    meta = stored(redis_client, task_id)
    assert meta["result"]["exc_type"] == "InvalidInput" and "task" in meta["result"]["exc_message"], meta
    assert client.embed(["still serving"])["dim"] == 384


def test_an_unknown_task_name_fails_with_invalid_message_naming_the_tasks(redis_client: redis.Redis, client: Client,
                                                                         worker: WorkerProcess) -> None:
    before = refused(client, worker).get("unknown_task", 0)
    sent = client.app.send_task("inferq.nope", kwargs={"texts": ["x"]}, queue="embed")
    meta = stored(redis_client, sent.id)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "InvalidMessage", meta
    assert meta["result"]["exc_message"] == ("no task is named 'inferq.nope'; this worker runs inferq.embed, "
                                             "inferq.classify, inferq.generate")
    assert refused(client, worker)["unknown_task"] == before + 1
    assert client.embed(["still serving"])["dim"] == 384


def test_list_entries_that_are_not_messages_go_to_the_dead_letter_list(redis_client: redis.Redis, client: Client,
                                                                       worker: WorkerProcess) -> None:
    # Anyone who can LPUSH can put anything in a queue; plain Kombu would stop the worker on the first.
    before = refused(client, worker).get("not_an_envelope", 0)
    redis_client.delete(DEAD_LETTER_KEY)
    redis_client.lpush("embed", json.dumps({"body": "", "headers": {}, "properties": {
        "delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "delivery_info": {}},
        "content-type": "application/json", "content-encoding": "utf-8"}))
    redis_client.lpush("embed", b"\x00 not even json")
    redis_client.lpush("classify", json.dumps([1, 2, 3]))
    redis_client.lpush("embed", "[" * 5000 + "]" * 5000)  # nested past what a JSON decoder recurses into
    # envelopes the take records, but Kombu could not make a message of: each stopped the worker, and came
    # back after the visibility timeout to stop the next one
    for corrupt in ({"headers": ["task", "inferq.embed"]}, {"headers": "inferq.embed"},
                    {"content-type": 7}, {"body": "not base64!"},
                    {"properties": {"body_encoding": "rot13"}}, {"properties": {"body_encoding": ["base64"]}},
                    # ids whose result key cannot be written: the store of the whole batch failed with them
                    {"headers": {"id": "\ud800x"}}, {"headers": {"id": "x" * 300}}):
        _, message = raw_message("inferq.embed", {"texts": ["x"]})
        for key, value in corrupt.items():
            if key in ("properties", "headers") and isinstance(value, dict):
                message[key].update(value)
            else:
                message[key] = value
        redis_client.lpush("embed", json.dumps(message))
    # a header nested deeper than Kombu's JSON recurses (and than the take's cjson reads), shallower than orjson
    # refuses: its record raised in every visibility sweep, so no message came back from a dead worker
    _, message = raw_message("inferq.embed", {"texts": ["x"]})
    message["headers"]["deep"] = "DEEP"
    redis_client.lpush("embed", json.dumps(message).replace('"DEEP"', "[" * 1010 + "]" * 1010))
    assert client.embed(["after garbage"])["dim"] == 384
    assert client.classify(["after garbage"], labels=["a", "b"])["model"] == "minilm"
    assert refused(client, worker)["not_an_envelope"] == before + 13
    kept = [json.loads(raw) for raw in redis_client.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert sorted(entry["queue"] for entry in kept) == ["classify"] + ["embed"] * 12
    assert sum("nest deeper than 32 levels" in entry["reason"] for entry in kept) == 1
    assert sum("headers.id is not a task id" in entry["reason"] for entry in kept) == 2
    reasons = " | ".join(entry["reason"] for entry in kept)
    assert "lacks 'exchange' or 'routing_key'" in reasons
    assert "the entry is not JSON" in reasons
    assert "RecursionError" in reasons
    assert "the entry is JSON list, not a message envelope object" in reasons
    assert "the envelope's 'headers' is JSON list, not an object" in reasons
    assert "the envelope's 'headers' is JSON string, not an object" in reasons
    assert "the envelope's 'content-type' is not a string" in reasons
    assert "the envelope's body is not base64" in reasons
    assert "body_encoding 'rot13' is not base64 or utf-8" in reasons
    assert "body_encoding \"['base64']\" is not base64 or utf-8" in reasons
    deadline = time.monotonic() + 30  # an answer is stored before its message is acknowledged
    while redis_client.hlen("unacked"):
        assert time.monotonic() < deadline, "messages left recorded as unacknowledged, to come back"
        time.sleep(0.05)
    assert "dropped an entry of queue 'embed' that is not a message" in worker.log()
    redis_client.delete(DEAD_LETTER_KEY)


def test_a_dead_letter_entry_is_cut_to_64_kib_of_utf8_whatever_the_message_holds() -> None:
    """Cut in characters and written with \\u escapes, an entry of emoji or of bytes that are not UTF-8 took 12
    times the limit, and the list keeps 10,000 entries."""
    from workers.receiving.dead_letter import RAW_LIMIT, entry

    for raw in (b"\xff" * 200_000, "\U0001f600" * 100_000, "x" * 200_000, "\ud800" * 1000):
        written = entry("a reason", "embed", raw, "an-id").encode()
        assert len(written) < RAW_LIMIT + 200, len(written)
        assert json.loads(written)["task_id"] == "an-id"


def test_a_message_due_further_ahead_than_a_worker_may_hold_it_is_refused(redis_client: redis.Redis,
                                                                          client: Client,
                                                                          worker: WorkerProcess) -> None:
    """A worker holds an ETA message unacknowledged until it is due; held past the visibility timeout (150 s),
    Redis hands it out again, and each copy runs. One due within half of it runs on Celery's own path."""
    before = refused(client, worker).get("eta_too_far", 0)
    far = client.app.send_task("inferq.embed", kwargs={"texts": ["in three hours"]}, queue="embed",
                               countdown=3 * 3600)
    meta = stored(redis_client, far.id)
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "InvalidMessage", meta
    assert "a worker holds a message at most 75 s (half the visibility timeout)" in meta["result"]["exc_message"]
    assert refused(client, worker)["eta_too_far"] == before + 1
    soon = client.app.send_task("inferq.embed", kwargs={"texts": ["in a second"]}, queue="embed", countdown=1)
    assert client.handle(soon.id).get(timeout=60)["dim"] == 384
