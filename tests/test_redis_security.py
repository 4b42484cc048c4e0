"""Redis with a password, and Redis over TLS (`rediss://`): workers, producers and Flower work through them,
and the password shows up in no log, no error message and no Flower page."""

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
from tests.conftest import ARTIFACTS, ROOT, WorkerProcess, free_port, start_redis_server, stop, worker_env

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-Redis-pw"


def start_redis(port: int, workdir: Path, probe: redis.Redis, *args: str) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own, with a password."""
    return start_redis_server(workdir, ["--requirepass", PASSWORD, "--appendonly", "no", "--port", str(port), *args],
                              probe)


@pytest.fixture(scope="module")
def guarded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    probe = redis.Redis(port=port, password=PASSWORD)
    server = start_redis(port, tmp_path_factory.mktemp("redis"), probe)
    yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    probe.close()
    stop(server, 20)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Redis that speaks only TLS, with a certificate from a CA the test makes (openssl)."""
    certs = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=inferq-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            "/CN=127.0.0.1")
    (certs / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.crt", "-days", "1", "-extfile", "ext.cnf")
    port = free_port()
    probe = redis.Redis(port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(certs / "ca.crt"))
    server = start_redis(0, certs, probe, "--tls-port", str(port), "--tls-cert-file", "server.crt",
                         "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no")
    yield (f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}",
           certs)
    probe.close()
    stop(server, 20)


def test_a_worker_and_a_producer_speak_tls_and_refuse_an_unverified_server(tls_redis: tuple[str, Path],
                                                                          tmp_path: Path) -> None:
    url, certs = tls_redis
    config = tmp_path / "inferq.toml"
    config.write_text("worker_concurrency = 8\n[models]\ngenerate = {}\n")
    env = worker_env(config, url)
    worker = WorkerProcess(env, ARTIFACTS / "tls-worker.log", f"tls-{os.getpid()}@localhost", ("--kinds", "embed"))
    client = Client(Settings(redis_url=url, result_timeout=60))
    try:
        worker.wait_ready(client)
        assert client.embed(["over TLS"])["dim"] == 384
        # the server speaks only TLS, and only a client that trusts its CA gets in
        other_ca = certs / "other.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs / "o.key"),
                        "-out", str(other_ca), "-days", "1", "-subj", "/CN=someone-else"], check=True,
                       capture_output=True, timeout=60)
        untrusting = Client(Settings(redis_url=url.replace(str(certs / "ca.crt"), str(other_ca)), connect_timeout=2))
        with pytest.raises(InferqConnectionError):
            untrusting.embed(["no entry"])
        untrusting.close()
        assert PASSWORD not in worker.log()
    finally:
        worker.stop()
        client.close()


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
        stop(flower, 20)
        worker.stop()
        client.close()
