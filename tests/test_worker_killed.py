"""A worker killed (SIGKILL) while it holds a batch's messages loses nothing: late acknowledgement puts
them back, and another worker answers every one."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, WorkerProcess, worker_env

pytestmark = pytest.mark.integration
DB = 14  # its own database: the session worker must not take these messages


def test_messages_held_by_a_killed_worker_are_answered_by_another(tmp_path: Path,
                                                                   tiny_models: dict[str, Path]) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text(f"""
visibility_timeout = 6
worker_concurrency = 16
[time_limits]
embed = 5
classify = 5
generate = 5
[batching]
generate_max_prompts = 2
[models.generate.tiny-lm]
source = {json.dumps(str(tiny_models["lm"]))}
max_length = 128
""")
    env = worker_env(config, url)
    sender = Celery("foreign", broker=url, backend=url, set_as_current=False)
    first = WorkerProcess(env, ARTIFACTS / "killed-worker.log", f"doomed-{os.getpid()}@localhost",
                          ("--kinds", "generate"))
    second: WorkerProcess | None = None
    try:
        ids = [sender.send_task("inferq.generate", kwargs={"prompt": f"hello {i}", "max_new_tokens": 120},
                                queue="generate").id for i in range(80)]
        keys = [f"celery-task-meta-{task_id}" for task_id in ids]
        deadline = time.monotonic() + 120
        while sum(v is not None for v in store.mget(keys)) < 10:  # the first worker is mid-way through
            assert time.monotonic() < deadline, first.log()[-2000:]
            time.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        answered_before = sum(v is not None for v in store.mget(keys))
        assert answered_before < 80, "the worker finished everything before it was killed; nothing was tested"
        held = store.hlen("unacked")
        assert held > 0  # it died holding delivered, unacknowledged messages
        killed_at = time.monotonic()
        second = WorkerProcess(env, ARTIFACTS / "rescuer-worker.log", f"rescuer-{os.getpid()}@localhost",
                               ("--kinds", "generate"))
        while sum(v is not None for v in store.mget(keys)) < 80:
            assert time.monotonic() - killed_at < 90, f"results missing; held={held}\n{second.log()[-2000:]}"
            time.sleep(0.2)
        results = [json.loads(v) for v in store.mget(keys) if v is not None]
        assert [r["status"] for r in results] == ["SUCCESS"] * 80
        assert all(r["result"]["model"] == "tiny-lm" for r in results)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        sender.close()
        store.flushdb()
        store.close()
