"""Clients that know only the task names and the JSON: plain Celery, raw protocol-2 messages, raw Redis reads.

They get the same answers as the Python producer, and every bad input comes back as a typed failure in
the result backend, in Celery's JSON form, while the worker keeps serving.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from benchmarks.protocol import task_message
from producer.client import Client
from tests.conftest import REDIS_URL, WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_celery() -> Iterator[Celery]:
    """A Celery app with nothing of ours configured: only the broker and backend URLs."""
    app = Celery("foreign", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    yield app
    app.close()


def stored(redis_client: redis.Redis, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The result exactly as stored in Redis, as a client in any language would read it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = redis_client.get(f"celery-task-meta-{task_id}")
        if raw is not None:
            meta: dict[str, Any] = json.loads(raw)
            if meta["status"] in ("SUCCESS", "FAILURE"):
                return meta
        time.sleep(0.05)
    raise AssertionError(f"no result stored for {task_id} within {timeout} s")


def test_plain_send_task_gets_the_same_answers(plain_celery: Celery, client: Client, worker: WorkerProcess) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("inferq.embed", "embed", {"texts": ["same answer"]}),
        ("inferq.classify", "classify", {"texts": ["The striker scored."], "labels": ["sports", "cooking"]}),
        ("inferq.generate", "generate", {"prompt": "The capital of France is", "max_new_tokens": 8}),
    ]
    for name, queue, kwargs in cases:
        foreign = plain_celery.send_task(name, kwargs=kwargs, queue=queue).get(timeout=120)
        ours = client.submit(queue, **kwargs).get()  # type: ignore[arg-type]
        assert_same_answer(foreign, ours, name)


def assert_same_answer(foreign: Any, ours: Any, where: str) -> None:
    """Equal, floats within float32 noise: the second call can run in a batch of another shape (the first
    classify call computes its label vectors in the same pass as its text, the second reuses them), and
    another batch shape takes other kernels, so scores may differ in the seventh digit."""
    if isinstance(foreign, float) and isinstance(ours, float):
        assert ours == pytest.approx(foreign, rel=1e-5, abs=1e-6), where
    elif isinstance(foreign, dict) and isinstance(ours, dict):
        assert foreign.keys() == ours.keys(), where
        for key in foreign:
            assert_same_answer(foreign[key], ours[key], f"{where}.{key}")
    elif isinstance(foreign, list) and isinstance(ours, list):
        assert len(foreign) == len(ours), where
        for i, (left, right) in enumerate(zip(foreign, ours, strict=True)):
            assert_same_answer(left, right, f"{where}[{i}]")
    else:
        assert foreign == ours, where


def raw_message(task: str, kwargs: Any, args: Any = (), task_id: str | None = None,
                content_type: str = "application/json") -> tuple[str, dict[str, Any]]:
    """A protocol-2 message with only the headers a minimal foreign client sends: task and id."""
    task_id = task_id or str(uuid.uuid4())
    body = base64.b64encode(json.dumps([list(args), kwargs, {}]).encode()).decode()
    return task_id, {
        "body": body, "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"task": task, "id": task_id},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": task.split(".")[-1]},
                       "priority": 0, "delivery_tag": str(uuid.uuid4())},
    }


def test_minimal_protocol_2_message_pushed_straight_into_redis(redis_client: redis.Redis, client: Client,
                                                               worker: WorkerProcess) -> None:
    task_id, message = raw_message("inferq.embed", {"texts": ["raw client"]})
    redis_client.lpush("embed", json.dumps(message))
    meta = stored(redis_client, task_id)
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == client.embed(["raw client"])


def test_the_benchmark_raw_client_sends_what_celery_sends(redis_client: redis.Redis, plain_celery: Celery,
                                                         client: Client, worker: WorkerProcess) -> None:
    """`inferq bench --client raw` builds its messages itself; they must be a Celery 5 client's, field for field."""
    kwargs = {"texts": ["bench raw client"]}
    celery_id = plain_celery.send_task("inferq.embed", kwargs=kwargs, queue="embed").id
    task_id, entry = task_message("inferq.embed", "embed", kwargs)
    theirs = stored(redis_client, celery_id)
    redis_client.lpush("embed", entry)
    ours = stored(redis_client, task_id)
    assert ours["status"] == theirs["status"] == "SUCCESS"
    assert ours["result"] == theirs["result"] == client.embed(["bench raw client"])
    # the same envelope as send_task's, down to the header names and the body's three parts
    sent = plain_celery.amqp.as_task_v2(str(uuid.uuid4()), "inferq.embed", kwargs=kwargs)
    envelope = json.loads(entry)
    assert set(envelope["headers"]) == set(sent.headers)
    assert json.loads(base64.b64decode(envelope["body"])) == [[], kwargs, dict(sent.body[2])]
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "embed"}


@pytest.mark.parametrize(("kind", "kwargs", "args", "exc_type", "message"), [
    ("embed", {"texts": ["a", "b", "c", 4]}, (), "InvalidInput",
     "texts[3] must be a string; got int (texts must be a non-empty list of strings)"),
    ("embed", {"texts": []}, (), "InvalidInput", "texts must be a non-empty list of strings; got []"),
    ("embed", {"texts": ["x"] * 17}, (), "InputTooLarge", "texts has 17 items; at most 16 are allowed per request"),
    ("embed", {"texts": ["x" * 2001]}, (), "InputTooLarge", "texts[0] has 2001 characters; at most 2000"),
    ("embed", {"texts": ["x"], "model": "bert-large"}, (), "UnknownModel",
     "model 'bert-large' is not configured for embed on this worker; available: minilm"),
    ("embed", {"texts": ["x"], "pooling": "max"}, (), "InvalidInput", "unknown argument(s) 'pooling'"),
    ("embed", {}, (["x"],), "InvalidInput", "inferq.embed takes keyword arguments only"),
    ("classify", {"texts": ["x"], "labels": "a,b"}, (), "InvalidInput", "labels must be a non-empty list"),
    ("classify", {"texts": ["x"], "top_k": -3}, (), "InvalidInput", "top_k must be an integer >= 1; got -3"),
    ("generate", {"prompt": "x", "temperature": "hot"}, (), "InvalidInput",
     "temperature must be a number from 0 to 2; got string 'hot'"),
    ("generate", {"prompt": "x", "max_new_tokens": 10**6}, (), "InputTooLarge", "max_new_tokens is 1000000"),
    ("generate", {"messages": []}, (), "InvalidInput", "messages must be a non-empty list"),
    ("generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, (), "InvalidInput", "got both"),
])
def test_bad_input_is_stored_as_a_typed_failure(redis_client: redis.Redis, plain_celery: Celery,
                                                worker: WorkerProcess, kind: str, kwargs: dict[str, Any],
                                                args: tuple[Any, ...], exc_type: str, message: str) -> None:
    result = plain_celery.send_task(f"inferq.{kind}", args=args, kwargs=kwargs, queue=kind)
    meta = stored(redis_client, result.id)
    assert meta["status"] == "FAILURE"
    failure = meta["result"]
    assert failure["exc_type"] == exc_type
    assert failure["exc_module"] == "producer.errors"
    assert isinstance(failure["exc_message"], str)  # one readable string, not Celery's argument list
    assert message in failure["exc_message"]


def test_nan_from_a_raw_client_is_refused(redis_client: redis.Redis, worker: WorkerProcess) -> None:
    # Python's json writes NaN; a careless client in any language can too
    task_id, message = raw_message("inferq.generate", {"prompt": "x", "top_p": float("nan")})
    redis_client.lpush("generate", json.dumps(message))
    failure = stored(redis_client, task_id)["result"]
    assert failure["exc_type"] == "InvalidInput"
    assert "top_p must be a number in (0, 1]; got nan" in failure["exc_message"]


def test_the_worker_keeps_serving_and_loaded_each_model_once(client: Client, worker: WorkerProcess) -> None:
    for i in range(20):
        assert client.embed([f"still here {i}"])["dim"] == 384
    assert worker.process.poll() is None
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5.0, destination=[worker.node])
    status = replies[0][worker.node]
    assert status["load_counts"] == {"embed/minilm": 1, "classify/tiny-sentiment": 1, "generate/smollm2": 1,
                                     "generate/tiny-lm": 1}
    assert status["models"]["generate"]["smollm2"]["device"] == "cpu"
    log = worker.log()
    assert log.count("loaded embed model 'minilm'") == 1
    assert log.count("loaded generate model 'smollm2'") == 1


def test_results_expire(redis_client: redis.Redis, client: Client, worker: WorkerProcess) -> None:
    handle = client.submit_embed(["ttl"])
    handle.get()
    ttl = redis_client.ttl(f"celery-task-meta-{handle.id}")
    assert 0 < ttl <= client.settings.result_expires
