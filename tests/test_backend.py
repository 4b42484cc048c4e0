"""The worker's result backend against a real Redis: one string per error, a SUCCESS is never overwritten."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis
from celery import Celery

from producer.app import make_celery
from producer.errors import InvalidInput
from producer.settings import Settings
from tests.conftest import REDIS_URL
from workers.receiving import backend as inferq_backend

pytestmark = pytest.mark.integration


@pytest.fixture()
def app(redis_client: redis.Redis) -> Iterator[Celery]:
    app = make_celery(Settings(redis_url=REDIS_URL, result_expires=600), "backend-test")
    app.loader.override_backends = inferq_backend.OVERRIDES
    assert isinstance(app.backend, inferq_backend.InferqRedisBackend)
    yield app
    app.close()


def stored(redis_client: redis.Redis, task_id: str) -> dict[str, object]:
    raw = redis_client.get(f"celery-task-meta-{task_id}")
    assert raw is not None
    meta: dict[str, object] = json.loads(raw)
    return meta


def test_a_stored_success_is_never_overwritten(app: Celery, redis_client: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, {"answer": 1}, "SUCCESS")
    app.backend.store_result(task_id, InvalidInput("late duplicate"), "FAILURE")  # a redelivered run's answer
    assert stored(redis_client, task_id)["result"] == {"answer": 1}
    assert 0 < redis_client.ttl(f"celery-task-meta-{task_id}") <= 600


def test_a_failure_can_be_followed_by_a_success_and_errors_are_one_string(app: Celery,
                                                                          redis_client: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, InvalidInput("texts must be a non-empty list of strings; got []"), "FAILURE")
    failure = stored(redis_client, task_id)["result"]
    assert failure == {"exc_type": "InvalidInput", "exc_module": "producer.errors",
                       "exc_message": "texts must be a non-empty list of strings; got []"}
    with pytest.raises(InvalidInput, match="got \\[\\]"):
        app.AsyncResult(task_id).get(timeout=5)
    app.backend.store_result(task_id, {"answer": 2}, "SUCCESS")  # a retry that succeeded
    assert stored(redis_client, task_id)["result"] == {"answer": 2}


def test_results_are_plain_json_with_the_same_floats_and_odd_values_still_stored(app: Celery,
                                                                                redis_client: redis.Redis) -> None:
    # orjson writes the results: any JSON reader must get the very floats back, and Celery's reader too
    vector = [0.1 + i / 7 for i in range(384)] + [1e-05, -2.5e300, 0.0]
    task_ids = [str(uuid.uuid4()) for _ in range(2)]
    app.backend.store_successes([(task_id, {"embeddings": [vector], "dim": 387}) for task_id in task_ids])
    for task_id in task_ids:
        assert stored(redis_client, task_id)["result"] == {"embeddings": [vector], "dim": 387}
        assert app.AsyncResult(task_id).get(timeout=5) == {"embeddings": [vector], "dim": 387}
    # a non-finite float becomes null (valid JSON for every client), not the NaN the json module writes
    nan_id = str(uuid.uuid4())
    app.backend.store_successes([(nan_id, {"score": float("nan")})])
    assert stored(redis_client, nan_id)["result"] == {"score": None}
    # a type only kombu's encoder knows falls back to it, instead of failing the store
    odd_id = str(uuid.uuid4())
    app.backend.store_result(odd_id, {"price": Decimal("1.5")}, "SUCCESS")
    assert app.AsyncResult(odd_id).get(timeout=5) == {"price": Decimal("1.5")}  # kombu's tagged form, round trip


def test_results_are_stored_after_redis_forgot_the_store_script(app: Celery, redis_client: redis.Redis) -> None:
    # a restarted Redis has no scripts: the batch is stored anyway, and still never over a success
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.store_successes([(first, {"answer": 1})])
    redis_client.script_flush()
    app.backend.store_successes([(first, {"answer": "late"}), (second, {"answer": 2})])
    assert stored(redis_client, first)["result"] == {"answer": 1}
    assert stored(redis_client, second)["result"] == {"answer": 2}
