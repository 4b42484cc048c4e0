"""The example web app, in-process over ASGI, against the real Redis and the session's worker."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from producer.settings import Settings
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http(settings: Settings, config_path: Path, worker: WorkerProcess) -> Iterator[TestClient]:
    os.environ["INFERQ_REDIS_URL"] = settings.redis_url
    try:
        from examples import webapp

        with TestClient(webapp.app) as test_client:
            yield test_client
        webapp.client.close()
    finally:
        del os.environ["INFERQ_REDIS_URL"]


def test_post_waits_for_the_result(http: TestClient) -> None:
    response = http.post("/v1/embed", json={"texts": ["hello from the web"]})
    assert response.status_code == 200
    assert response.json()["dim"] == 384
    response = http.post("/v1/classify", json={"texts": ["The striker scored."], "labels": ["sports", "cooking"]})
    assert response.json()["results"][0][0]["label"] == "sports"


def test_bad_input_is_a_422_with_the_typed_error(http: TestClient) -> None:
    response = http.post("/v1/embed", json={"texts": [1]})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "InvalidInput"
    assert "texts[0] must be a string; got int" in response.json()["error"]["message"]
    unknown = http.post("/v1/generate", json={"prompt": "x", "model": "nope"})  # found out by the worker
    assert unknown.status_code == 422 and unknown.json()["error"]["type"] == "UnknownModel"
    assert http.post("/v1/translate", json={}).status_code == 404


def test_async_submit_then_poll(http: TestClient) -> None:
    task_id = http.post("/v1/generate/async", json={"prompt": "Hello", "max_new_tokens": 4}).json()["id"]
    deadline = time.monotonic() + 60
    while not (body := http.get(f"/v1/tasks/{task_id}").json())["ready"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert body["result"]["completion_tokens"] <= 4
