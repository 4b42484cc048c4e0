"""A Redis with a password: workers, producers and Flower work through `redis://:password@host`, and the
password shows up in no log, no error message and no Flower page."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.client import Client
from producer.errors import InferqConnectionError
from producer.settings import Settings
from tests.conftest import ARTIFACTS, ROOT, WorkerProcess, free_port

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-Redis-pw"


@pytest.fixture(scope="module")
def guarded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = redis.Redis(port=port, password=PASSWORD)
    deadline = time.monotonic() + 20
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    probe.close()
    server.terminate()
    server.wait(timeout=20)


def test_worker_producer_and_flower_work_and_never_show_the_password(guarded_redis: str, tmp_path: Path) -> None:
    config = tmp_path / "inferq.toml"
    config.write_text("worker_concurrency = 8\n[models]\ngenerate = {}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERQ_", "FLOWER_"))}
    env.update(INFERQ_REDIS_URL=guarded_redis, INFERQ_CONFIG=str(config), HF_HUB_OFFLINE="1")
    ARTIFACTS.mkdir(exist_ok=True)
    worker = WorkerProcess(env, ARTIFACTS / "password-worker.log", f"pw-{os.getpid()}@localhost", ("--kinds", "embed"))
    client = Client(Settings(redis_url=guarded_redis, result_timeout=60))
    port = free_port()
    flower_log = ARTIFACTS / "password-flower.log"
    with flower_log.open("wb") as log:
        flower = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", "--port", str(port)],
                                  env={**env, "INFERQ_FLOWER_BASIC_AUTH": "admin:flower-pw"}, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        worker.wait_ready(client)
        assert client.embed(["through a password"])["dim"] == 384
        token = base64.b64encode(b"admin:flower-pw").decode()
        pages = []
        for path in ("/", "/broker", "/api/workers", "/metrics"):
            deadline = time.monotonic() + 60
            while True:
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                                     headers={"Authorization": f"Basic {token}"})
                    with urllib.request.urlopen(request, timeout=20) as response:
                        pages.append(response.read().decode())
                    break
                except OSError:
                    assert flower.poll() is None, flower_log.read_text()
                    assert time.monotonic() < deadline, f"flower did not serve {path}"
                    time.sleep(0.5)
        assert "inferq_queue_depth" in pages[-1]
        wrong = Client(Settings(redis_url=guarded_redis.replace(PASSWORD, "wrong-pw"), connect_timeout=2))
        with pytest.raises(InferqConnectionError) as refused:
            wrong.embed(["no entry"])
        wrong.close()
        leaks = [name for name, text in [("worker log", worker.log()), ("flower log", flower_log.read_text()),
                                         ("error", str(refused.value)), *zip(("/", "/broker", "/api/workers",
                                                                              "/metrics"), pages, strict=True)]
                 if PASSWORD in text or "wrong-pw" in text]
        assert not leaks, f"the password appears in: {leaks}"
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        worker.stop()
        client.close()
