"""Fault drills against a real worker: out of device memory (simulated on the CPU by the fault setting),
slow work past its time limit, expired tasks."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from producer.client import Client
from producer.errors import InferqError, OutOfMemory, TaskTimeout
from producer.settings import Limits, Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, WorkerProcess, serving, worker_env

pytestmark = pytest.mark.integration
DB = 10
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
OOM_ABOVE = 4000  # padded tokens per encoder batch


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, WorkerProcess]]:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path_factory.mktemp("faults") / "inferq.toml"
    config.write_text(f"fault_oom_above_tokens = {OOM_ABOVE}\nworker_concurrency = 128\nvisibility_timeout = 30\n"
                      "[time_limits]\nembed = 5\nclassify = 5\ngenerate = 5\n[models]\ngenerate = {}\n")
    env = worker_env(config, URL)
    ARTIFACTS.mkdir(exist_ok=True)
    worker = WorkerProcess(env, ARTIFACTS / "faults-worker.log", f"faults-{os.getpid()}@localhost",
                           ("--kinds", "embed"))
    # the default limits, not those of the session's test config (INFERQ_CONFIG in this process)
    client = Client(Settings(redis_url=URL, result_timeout=120, limits=Limits()))
    try:
        with serving(worker, client) as started:
            yield started
    finally:
        store.flushdb()
        store.close()


def outcome(handle: Any) -> Any:
    try:
        return handle.get()
    except InferqError as exc:
        return exc


def text(i: int, words: int) -> str:
    return f"request {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(words))


def test_an_oom_batch_is_split_and_only_the_input_too_big_alone_fails(drill: tuple[Client, WorkerProcess]) -> None:
    client, worker = drill
    small = [text(i, 34) for i in range(64)]  # ~75 tokens each: 64 together are far over the budget
    alone = {t: client.embed([t])["embeddings"][0] for t in small[:4]}
    huge = [text(1000 + i, 120) for i in range(20)]  # 20 x ~250 tokens: over the budget even on its own
    handles = [client.submit_embed([t]) for t in small[:32]] + [client.submit_embed(huge)] + \
              [client.submit_embed([t]) for t in small[32:]]
    outcomes = [outcome(handle) for handle in handles]
    failed = outcomes.pop(32)
    assert isinstance(failed, OutOfMemory), failed
    assert "does not fit in device memory even on its own (20 input(s)" in str(failed)
    assert all(isinstance(result, dict) for result in outcomes), [o for o in outcomes if not isinstance(o, dict)]
    for t, result in zip(small, outcomes, strict=True):
        if t in alone:
            assert result["embeddings"][0] == pytest.approx(alone[t], abs=1e-5)
    assert "retrying in halves" in worker.log()
    assert client.embed(["the worker still serves"])["dim"] == 384


def test_work_past_its_time_limit_fails_with_task_timeout_and_the_worker_goes_on(
        drill: tuple[Client, WorkerProcess]) -> None:
    client, _ = drill
    # Requests of 15 long texts each: as many as, one at a time, would take ten times the 5 s embed limit
    # (timed here, so a faster machine gets more; batched they go a few times faster): the later ones
    # cannot be answered in time.
    started = time.perf_counter()
    client.embed([text(j, 100) for j in range(15)])
    count = max(120, math.ceil(10 * 5 / (time.perf_counter() - started)))
    handles = [client.submit_embed([text(i * 15 + j, 100) for j in range(15)]) for i in range(count)]
    kinds = Counter(type(outcome(handle)).__name__ for handle in handles)
    assert set(kinds) <= {"dict", "TaskTimeout"}, kinds
    assert kinds["TaskTimeout"] > 0, kinds
    with pytest.raises(TaskTimeout, match=r"the embed request (waited|ran) .*limit of 5 s"):
        for handle in handles:
            handle.get()
    # once the backlog has drained (abandoned requests are dropped unrun), it answers in time again
    deadline = time.monotonic() + 60
    while not isinstance(outcome(client.submit_embed(["the worker still serves"])), dict):
        assert time.monotonic() < deadline, "the worker never recovered"


def test_an_expired_task_is_not_run(drill: tuple[Client, WorkerProcess]) -> None:
    client, worker = drill

    def requests() -> int:
        replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[worker.node])
        return int(replies[0][worker.node]["counts"].get("embed/minilm:requests", 0))

    before = requests()
    result = client.app.send_task("inferq.embed", kwargs={"texts": ["too late"]}, queue="embed",
                                  expires=datetime.now(UTC) - timedelta(seconds=5))
    deadline = time.monotonic() + 30
    while result.state not in ("REVOKED", "SUCCESS", "FAILURE"):
        assert time.monotonic() < deadline, result.state
        time.sleep(0.1)
    assert result.state == "REVOKED"
    assert requests() == before

