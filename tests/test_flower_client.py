"""Flower's REST API as a foreign client: `inferq flower`, as the README starts it, sends inferq tasks by name
and reads their results (the README's two curl commands)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REDIS_URL, WorkerProcess, free_port, stop

pytestmark = pytest.mark.integration


USER, PASSWORD = "admin", "s3cret"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Authorization": AUTH}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def flower(worker: WorkerProcess) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "INFERQ_REDIS_URL": REDIS_URL, "INFERQ_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", f"--port={port}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthcheck", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, "flower exited"
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(0.3)
        yield base
    finally:
        stop(process, 20)


def result_of(base: str, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply: dict[str, Any] = call(f"{base}/api/task/result/{task_id}")
        if reply["state"] in ("SUCCESS", "FAILURE"):
            return reply
        time.sleep(0.1)
    raise AssertionError(f"no result for {task_id}")


def test_flower_send_task_gets_the_contract_result(flower: str) -> None:
    sent = call(f"{flower}/api/task/send-task/inferq.classify",
                {"kwargs": {"texts": ["The striker scored."], "labels": ["sports", "cooking"]}, "queue": "classify"})
    reply = result_of(flower, sent["task-id"])
    assert reply["state"] == "SUCCESS"
    assert reply["result"]["model"] == "minilm"
    assert reply["result"]["results"][0][0]["label"] == "sports"


def test_flower_sees_the_typed_failure(flower: str) -> None:
    sent = call(f"{flower}/api/task/send-task/inferq.embed", {"kwargs": {"texts": "oops"}, "queue": "embed"})
    reply = result_of(flower, sent["task-id"])
    assert reply["state"] == "FAILURE"
    assert "texts must be a non-empty list of strings; got string 'oops'" in json.dumps(reply["result"])
