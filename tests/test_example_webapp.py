"""The example web app, in-process over ASGI, against the real Redis and the session's worker."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from producer.settings import Settings
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http(settings: Settings, config_path: Path, worker: WorkerProcess) -> Iterator[TestClient]:
    saved = os.environ.get("INFERQ_REDIS_URL")
    os.environ["INFERQ_REDIS_URL"] = settings.redis_url  # the example app reads its settings from the environment
    try:
        from examples import webapp

        with TestClient(webapp.app) as test_client:
            yield test_client
        webapp.client.close()
    finally:
        if saved is None:
            del os.environ["INFERQ_REDIS_URL"]
        else:
            os.environ["INFERQ_REDIS_URL"] = saved


def error_of(response: Any, status: int) -> dict[str, str]:
    """The app's one error shape, {"error": {"type": ..., "message": ...}}, with the expected status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["message", "type"], body
    return dict(body["error"])


def test_post_waits_for_the_result(http: TestClient) -> None:
    response = http.post("/v1/embed", json={"texts": ["hello from the web"]})
    assert response.status_code == 200
    assert response.json()["dim"] == 384
    response = http.post("/v1/classify", json={"texts": ["The striker scored."], "labels": ["sports", "cooking"]})
    assert response.json()["results"][0][0]["label"] == "sports"


def test_bad_input_is_a_422_with_the_typed_error(http: TestClient) -> None:
    response = http.post("/v1/embed", json={"texts": [1]})
    error = error_of(response, 422)
    assert error["type"] == "InvalidInput"
    assert "texts[0] must be a string; got int" in error["message"]
    unknown = http.post("/v1/generate", json={"prompt": "x", "model": "nope"})  # found out by the worker
    assert error_of(unknown, 422)["type"] == "UnknownModel"
    assert error_of(http.post("/v1/translate", json={}), 404)["type"] == "NotFound"


def test_a_body_that_is_not_json_is_a_422_saying_so(http: TestClient) -> None:
    json_header = {"content-type": "application/json"}
    for path in ("/v1/embed", "/v1/generate/async"):
        error = error_of(http.post(path, content=b'{"texts": ["no closing brace"]', headers=json_header), 422)
        assert error["type"] == "InvalidInput" and error["message"].startswith("the body is not valid JSON ("), error
        error = error_of(http.post(path, content=b"", headers=json_header), 422)
        assert error["message"] == "the body is empty; send a JSON object of the task's kwargs"
        error = error_of(http.post(path, content=b"\xff\xfe\xfd", headers=json_header), 422)
        assert error["message"].startswith("the body is not valid JSON ("), error


def test_every_error_has_the_one_shape(http: TestClient) -> None:
    error = error_of(http.post("/v1/embed", json=["hello"]), 422)  # JSON, but not an object
    assert error == {"type": "InvalidInput", "message": "the body must be a JSON object of the task's kwargs"}
    error = error_of(http.post("/v1/translate/async", json={}), 404)
    assert error["message"] == "no such task kind 'translate'; the kinds are embed, classify, generate"
    assert error_of(http.get("/v1/nothing/here"), 404) == {"type": "NotFound", "message": "Not Found"}
    response = http.get("/v1/embed")  # the framework's own 405 keeps its Allow header
    assert error_of(response, 405) == {"type": "MethodNotAllowed", "message": "Method Not Allowed"}
    assert response.headers["allow"] == "POST"
    error = error_of(http.get("/v1/tasks/not-a-task-id"), 404)  # the framework's validation of the typed id
    assert error["type"] == "NotFound" and error["message"].startswith("path.task_id: Input should be a valid UUID")


def test_a_kwarg_named_like_a_submit_parameter_is_bad_input_not_a_crash(http: TestClient) -> None:
    error = error_of(http.post("/v1/embed", json={"texts": ["hi"], "kind": "classify"}), 422)
    assert error["message"] == "unknown argument(s) 'kind' for inferq.embed; allowed: model, texts, normalize"
    assert error_of(http.post("/v1/embed/async", json={"self": 1}), 422)["type"] == "InvalidInput"
    # null still means "the default", as it does for Client.submit()
    assert http.post("/v1/embed", json={"texts": ["hi"], "model": None, "normalize": None}).json()["dim"] == 384


def test_async_submit_then_poll(http: TestClient) -> None:
    task_id = http.post("/v1/generate/async", json={"prompt": "Hello", "max_new_tokens": 4}).json()["id"]
    deadline = time.monotonic() + 60
    while not (body := http.get(f"/v1/tasks/{task_id}").json())["ready"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert body["result"]["completion_tokens"] <= 4
    assert http.get(f"/v1/tasks/{task_id.upper()}").json() == body  # any spelling of the UUID


def test_a_task_id_that_is_not_a_uuid_is_a_404(http: TestClient) -> None:
    for task_id in ("hello", "1234", f"{uuid.uuid4()}x"):
        error = error_of(http.get(f"/v1/tasks/{task_id}"), 404)
        assert error["type"] == "NotFound" and "path.task_id: Input should be a valid UUID" in error["message"]
    # A well-formed id the app never issued cannot be told from a task still queued (see the README).
    never_issued = str(uuid.uuid4())
    assert http.get(f"/v1/tasks/{never_issued}").json() == {"id": never_issued, "ready": False}


def test_a_cancelled_generation_is_a_409_not_bad_input(http: TestClient) -> None:
    """Failures that are not the request's fault keep their own status: a 422 would tell the caller to fix a
    request that was fine."""
    from examples import webapp

    task_id = http.post("/v1/generate/async", json={"prompt": "Count to a thousand: 1, 2, 3,",
                                                    "max_new_tokens": 256}).json()["id"]
    webapp.client.cancel(task_id)
    deadline = time.monotonic() + 60
    while (response := http.get(f"/v1/tasks/{task_id}")).status_code == 200:
        assert not response.json()["ready"], "the generation was not cancelled"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert error_of(response, 409)["type"] == "Cancelled"
