"""Redis restarts mid-load (append-only file, appendfsync everysec, as in the compose file): after a clean
SHUTDOWN no accepted task is lost; after a hard kill the loss is measured; workers reconnect by themselves and
a producer's call during the outage either succeeds or raises InferqConnectionError, never hangs.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Producer
from kombu import Queue as KombuQueue

from producer.client import Client, Handle
from producer.errors import InferqConnectionError
from producer.settings import Settings
from tests.conftest import ARTIFACTS, WorkerProcess, free_port, start_redis_server, stop, worker_env
from workers.receiving.transport import Transport

pytestmark = pytest.mark.integration
SENT = 400


def start_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    probe = redis.Redis(port=port)
    try:
        return start_redis_server(data, ["--port", str(port), "--appendonly", "yes", "--appendfsync", "everysec"],
                                  probe)
    finally:
        probe.close()


def redis_and_worker(tmp_path: Path, name: str, extra_config: str = "",
                     **env: str) -> tuple[int, subprocess.Popen[bytes], str, WorkerProcess]:
    """A Redis of the test's own (append-only) and an embed worker on it, with short limits."""
    port = free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    config = tmp_path / "inferq.toml"
    config.write_text(f"{extra_config}visibility_timeout = 10\n[time_limits]\nembed = 5\nclassify = 5\n"
                      "generate = 5\n[models]\ngenerate = {}\n")
    worker = WorkerProcess(worker_env(config, url, **env), ARTIFACTS / f"restart-{name}-worker.log",
                           f"restart-{name}-{os.getpid()}@localhost", ("--kinds", "embed"))
    return port, server, url, worker


@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_a_redis_restart_mid_load(how: str, tmp_path: Path) -> None:
    port, server, url, worker = redis_and_worker(tmp_path, how, "worker_concurrency = 16\n")
    client = Client(Settings(redis_url=url, result_timeout=30, connect_timeout=2))
    accepted: list[tuple[float, Handle[Any]]] = []  # (when it was sent, its handle)
    refused: list[float] = []
    try:
        worker.wait_ready(client)

        def produce() -> None:
            for i in range(SENT):
                started = time.monotonic()
                try:
                    accepted.append((time.time(), client.submit_embed([f"task {i}"])))
                except InferqConnectionError:
                    refused.append(time.monotonic() - started)  # a clear error, after a bounded wait
                time.sleep(0.01)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(1.5)
        stopped_at = time.time()
        if how == "shutdown":
            redis.Redis(port=port).shutdown()  # writes and fsyncs the append-only file
        else:
            server.kill()
        server.wait(timeout=20)
        time.sleep(2)
        server = start_redis(port, tmp_path)
        producer.join(timeout=120)
        assert not producer.is_alive(), "a producer call hung"
        # One deadline for all: a lost task is one with no result 30 s after the last was sent.
        deadline = time.monotonic() + 30
        waiting = list(accepted)
        while waiting and time.monotonic() < deadline:
            waiting = [(sent, handle) for sent, handle in waiting if not handle.ready()]
            time.sleep(0.2)
        lost = {handle.id: sent for sent, handle in waiting}
        answered = [handle.get(timeout=5) for _, handle in accepted if handle.id not in lost]
        assert [answer["dim"] for answer in answered] == [384] * len(answered)
        window = stopped_at - min(lost.values(), default=stopped_at)
        print(f"\nredis {how}: {len(accepted)} accepted, {len(answered)} answered, {len(lost)} lost"
              + (f" (sent at most {window:.2f} s before Redis stopped)" if lost else "")
              + f", {len(refused)} calls refused with InferqConnectionError (longest wait "
                f"{max(refused, default=0):.1f} s)")
        assert len(answered) + len(lost) == len(accepted) == SENT - len(refused)
        assert all(wait < 30 for wait in refused)
        if how == "shutdown":
            assert not lost
        else:  # appendfsync everysec: what Redis accepted in about its last second may not be on disk
            assert window < 3.0, f"a task sent {window:.1f} s before the kill was lost: more than everysec's window"
        assert worker.process.poll() is None
        assert client.embed(["after the restart"])["dim"] == 384  # both sides reconnected by themselves
    finally:
        worker.stop()
        client.close()
        stop(server, 20)


def test_a_message_popped_as_redis_stops_is_put_back_when_it_returns(tmp_path: Path) -> None:
    """Kombu takes a message off its queue (BRPOP), then records it as unacknowledged: Redis stopping between
    the two left the message in the worker's memory only, and a clean restart lost it. The worker's transport
    keeps it and puts it back at the head of its queue once Redis answers again. The two halves are run here
    one after the other, with the stop between them, on Kombu's own basic_get path."""
    port = free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with Connection(url, transport=Transport) as connection:
            channel = connection.default_channel
            for body in ("first", "second"):
                Producer(channel).publish(body, routing_key="embed", declare=[KombuQueue("embed")])
            message = channel.basic_get("embed", no_ack=True)  # popped; not yet recorded
            assert message is not None and message.payload == "first"
            redis.Redis(port=port).shutdown()
            server.wait(timeout=20)
            with pytest.raises(connection.connection_errors):
                channel.qos.append(message, message.delivery_tag)  # the record Kombu makes next
        server = start_redis(port, tmp_path)
        with Connection(url, transport=Transport) as connection:
            channel = connection.default_channel  # the first channel to reach Redis puts it back
            store = redis.Redis(port=port)
            assert store.hlen("unacked") == 0
            assert store.llen("embed") == 2
            again = channel.basic_get("embed", no_ack=True)
            assert again is not None and again.payload == "first"  # at the head, where it was
            assert again.delivery_tag == message.delivery_tag and not again.delivery_info.get("redelivered")
            store.close()
    finally:
        stop(server, 20)


def test_coalesced_calls_across_a_redis_restart_get_their_answer_or_a_clear_error(tmp_path: Path) -> None:
    """The coalescer is told of answers over a pub/sub connection that a restart breaks: calls in flight still
    get their answers (notices resume, or the once-a-second read of the keys finds them), calls made during
    the outage fail with InferqConnectionError, and none hangs."""
    port, server, url, worker = redis_and_worker(tmp_path, "coalesced")
    client = Client(Settings(redis_url=url, result_timeout=30, connect_timeout=2, coalesce_ms=5.0))
    outcomes: list[str] = []
    try:
        worker.wait_ready(client)

        def caller(n: int) -> None:
            for i in range(40):
                try:
                    answer = client.embed([f"caller {n}, call {i}"])
                    outcomes.append("answered" if len(answer["embeddings"]) == 1 else f"wrong: {answer}")
                except InferqConnectionError:
                    outcomes.append("refused")
                except Exception as exc:  # a ResultTimeout here is a call the restart left hanging
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

        callers = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for thread in callers:
            thread.start()
        time.sleep(1.0)
        redis.Redis(port=port).shutdown()
        server.wait(timeout=20)
        time.sleep(2)
        server = start_redis(port, tmp_path)
        for thread in callers:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in callers), "a coalesced call hung"
        print(f"\ncoalesced calls across a restart: {outcomes.count('answered')} answered, "
              f"{outcomes.count('refused')} refused with InferqConnectionError")
        assert [o for o in outcomes if o not in ("answered", "refused")] == []
        assert len(outcomes) == 8 * 40
        assert client.embed(["after the restart"])["dim"] == 384
    finally:
        worker.stop()
        client.close()
        stop(server, 20)


@pytest.mark.parametrize("path", ["fast", "celery"])
def test_results_a_refusing_result_redis_could_not_store_are_answered_once_it_takes_writes(
        path: str, tmp_path: Path) -> None:
    """A result Redis that refuses writes with an error of its own (READONLY here; OOM under maxmemory and
    MISCONF alike) while it answers: the messages stay unacknowledged and come back after the visibility
    timeout. They used to stay in the receiver's prefetch window too, which filled for good: the worker took
    nothing more, ever, while its health check passed. On Celery's own path (redelivered messages, ETAs,
    ``fast_path = false``) Celery acknowledged them with nothing stored, or left them in the window."""
    (tmp_path / "results").mkdir()
    results_port = free_port()
    results = redis.Redis(port=results_port)
    results_server = start_redis_server(tmp_path / "results", ["--port", str(results_port)], results)
    results_url = f"redis://127.0.0.1:{results_port}/0"
    extra = "worker_concurrency = 2\n" + ("fast_path = false\n" if path == "celery" else "")
    _, server, url, worker = redis_and_worker(tmp_path, f"refused-store-{path}", extra,
                                              INFERQ_RESULT_BACKEND=results_url)
    client = Client(Settings(redis_url=url, result_backend=results_url, result_timeout=60, connect_timeout=2))
    try:
        worker.wait_ready(client)
        results.replicaof("127.0.0.1", free_port())  # a replica of a master that is not there: read-only
        handles = [client.submit_embed([f"task {i}"]) for i in range(40)]
        deadline = time.monotonic() + 60
        while "read only replica" not in worker.log():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # more windows' worth of stores refused
        results.replicaof("NO", "ONE")
        answers = [handle.get(timeout=60) for handle in handles]  # the visibility timeout is 10 s
        assert [answer["dim"] for answer in answers] == [384] * len(handles)
        assert worker.process.poll() is None
        # one line a refused store, saying what becomes of the message; not Celery's two tracebacks besides
        log = worker.log()
        assert "its message stays unacknowledged" in log or "stay unacknowledged" in log, log[-3000:]
        assert "Exception raised outside body" not in log and "raised unexpected: ResultNotStored" not in log
        assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    finally:
        worker.stop()
        client.close()
        stop(server, 20)
        stop(results_server, 20)
        results.close()
