"""The producer's bounds: bad input is refused before sending, a dead broker is a
clear, bounded error rather than a hang, and get() gives up at its own timeout."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client, Handle
from producer.errors import InferqConnectionError, InputTooLarge, InvalidInput, ResultTimeout
from producer.settings import Limits, Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, ROOT, free_port, start_redis_server, stop


def silent_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture()
def offline_client() -> Client:
    return Client(Settings(redis_url=silent_url(), connect_timeout=0.5, limits=Limits()))  # the default limits


def test_bad_input_is_refused_before_anything_is_sent(offline_client: Client) -> None:
    # nothing listens on the broker port: only a check made before sending can answer like this
    with pytest.raises(InvalidInput, match=r"texts\[1\] must be a string; got int"):
        offline_client.submit("embed", texts=["ok", 3])
    with pytest.raises(InputTooLarge, match="texts has 257 items; at most 256"):
        offline_client.embed(["x"] * 257)
    with pytest.raises(InvalidInput, match="texts must be a non-empty list of strings; got string 'one text'"):
        offline_client.embed("one text")
    # the typed helpers pass what they were given on to validation: no TypeError or ValueError of their own
    wrong: list[tuple[Callable[[], Any], str]] = [
        (lambda: offline_client.embed(5), "texts"),  # type: ignore[arg-type]
        (lambda: offline_client.embed(("a", "b"), normalize="yes"), "normalize"),  # type: ignore[arg-type]
        (lambda: offline_client.classify(["a"], labels=5), "labels"),  # type: ignore[arg-type]
        (lambda: offline_client.generate(messages="hello"), "messages"),  # type: ignore[arg-type]
        (lambda: offline_client.generate(messages=["hi"]), "messages"),  # type: ignore[list-item]
        (lambda: offline_client.generate("x", stop=5), "stop"),
        (lambda: offline_client.generate("x", stream="no"), "stream")]
    for call, names in wrong:
        with pytest.raises(InvalidInput, match=names):
            call()
    # an argument named like submit's own parameter, or a timeout that would wait forever, is bad input too
    with pytest.raises(InvalidInput, match=r"unknown argument.*'kind'"):
        offline_client.submit("embed", texts=["a"], **{"kind": "classify"})
    for never in (float("nan"), -1.0, "5"):
        with pytest.raises(InvalidInput, match="timeout must be a number of seconds >= 0"):
            Handle(offline_client.app.AsyncResult("some-id"), 1.0, silent_url()).get(never)  # type: ignore[arg-type]
    # ... and take any iterable of strings as the list it stands for (numpy and pandas give their own)
    with pytest.raises(InputTooLarge, match="texts has 257 items"):  # validated as a list, before sending
        offline_client.embed(f"text {i}" for i in range(257))
    with pytest.raises(InputTooLarge, match="labels has 1001 items"):
        offline_client.classify(["x"], labels={f"label {i}" for i in range(1001)})


def test_a_dead_broker_raises_a_connection_error_within_seconds(offline_client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(InferqConnectionError, match=r"could not reach the broker or result backend at redis://127\.0\.0\.1:\d+/0"):
        offline_client.embed(["hello"])
    assert time.monotonic() - started < 30  # bounded by the connect timeout and the publish retry policy


def test_a_redis_that_accepts_and_never_answers_is_a_connection_error_after_the_connect_timeout() -> None:
    """A partition, or a Redis stalled on a fork, after the connection was made: a producer's command waited
    30 s for its answer, and was then tried once more (a send took 30 s, get(timeout=0.5) 60 s)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    hung = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    working = f"redis://{REDIS_HOST}:{REDIS_PORT}/5"
    sender = Client(Settings(redis_url=working, broker_url=hung, connect_timeout=1))
    reader = Client(Settings(redis_url=working, result_backend=hung, connect_timeout=1))
    try:
        started = time.monotonic()
        with pytest.raises(InferqConnectionError, match="could not reach the broker"):
            sender.submit_embed(["hello"])
        sent_for = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(InferqConnectionError, match="Timeout reading"):
            reader.handle("6f1c1c3e-7a5c-4d59-9f4f-3d0f6b8b9a11").get(timeout=0.5)
        read_for = time.monotonic() - started
        assert sent_for < 10 and read_for < 10, (sent_for, read_for)
    finally:
        sender.close()
        reader.close()
        listener.close()
        for connection in accepted:
            connection.close()


@pytest.mark.integration
@pytest.mark.parametrize("timeout", [0.05, 2.05])
def test_get_gives_up_at_its_timeout_not_the_next_whole_second(timeout: float) -> None:
    """Celery's result consumer waits in steps of one second: 0.1 s took 1.0 and 2.5 took 3.0. Timeouts just
    past a whole second leave the bug nearly a second over, and a correct client as much slack."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"  # no worker listens here
    client = Client(Settings(redis_url=url))
    try:
        handle = client.submit_embed(["nobody takes this"])
        started = time.monotonic()
        with pytest.raises(ResultTimeout, match=f"gave no result within {timeout:g} s"):
            handle.get(timeout=timeout)
        took = time.monotonic() - started
        assert timeout <= took < math.ceil(timeout) - 0.1, took  # the next whole second was the bug
    finally:
        client.app.backend.client.flushdb()  # the message, its result key and Kombu's bindings
        client.close()


@pytest.mark.integration
def test_handles_made_on_another_thread_let_go_quietly_after_close_and_redis_gone(tmp_path: Path) -> None:
    """Celery gives each thread a result backend, and a handle subscribes to its result at send, on its
    thread's. close() forgot only the closing thread's subscriptions, so handles made on a producer thread,
    collected once Redis was gone, retried their unsubscribe and raised in __del__ (seen after the Sentinel
    drill as a warning in a later test)."""
    port = free_port()
    server = start_redis_server(tmp_path, ["--port", str(port)], redis.Redis(port=port))
    client = Client(Settings(redis_url=f"redis://127.0.0.1:{port}/0", connect_timeout=0.5, coalesce_ms=0))
    handles: list[Handle[Any]] = []
    made = threading.Thread(target=lambda: handles.extend(client.submit_embed([f"text {i}"]) for i in range(3)))
    made.start()
    made.join()
    assert len(handles) == 3
    raised: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, raised.append
    try:
        client.close()
        server.kill()
        server.wait(timeout=10)
        handles.clear()
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not raised, [f"{type(one.exc_value).__name__}: {one.exc_value}" for one in raised]


@pytest.mark.integration
def test_a_script_that_exits_on_a_result_timeout_prints_only_its_error() -> None:
    """The traceback keeps the handle alive until Python shuts down; its AsyncResult then tried to unsubscribe
    with imports gone ("Exception ignored in: AsyncResult.__del__ ... sys.meta_path is None")."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"  # no worker listens here
    script = ("from producer.client import Client\nfrom producer.settings import Settings\n"
              f"client = Client(Settings(redis_url={url!r}, result_timeout=1.2))\n"
              "def main():\n    client.embed(['nobody takes this'])\nmain()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                              cwd=ROOT)
    finally:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=11).flushdb()
    assert done.returncode == 1
    assert "producer.errors.ResultTimeout: task" in done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.integration
def test_a_bulk_run_cut_off_by_a_lost_broker_reports_every_line_it_sent(tmp_path: Path) -> None:
    """It stops at the first line it cannot send (every later one would fail the same way), but each line
    before it, and that one, gets its output record: the lines it had in flight were dropped unreported."""
    from producer.bulk import run_bulk

    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)  # no worker reads it
    client = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{port}/0", connect_timeout=0.5, result_timeout=2))

    def lines() -> Any:
        yield '"first"'
        yield '"second"'
        stop(server, 10)  # the broker goes away with two lines in flight
        yield '"third"'
        yield '"never sent"'

    out = io.StringIO()
    try:
        with pytest.raises(InferqConnectionError):
            run_bulk(client, "embed", lines(), out, window=8, progress=False)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [record["line"] for record in records] == [1, 2, 3]
        assert all("error" in record for record in records), records
        assert records[2]["error"]["type"] == "InferqConnectionError"
    finally:
        stop(server, 10)
        client.close()


def test_a_coalescing_client_dropped_without_close_lets_its_thread_end() -> None:
    def coalescers() -> int:
        return sum(thread.name == "inferq-coalescer" and thread.is_alive() for thread in threading.enumerate())

    before = coalescers()
    client = Client(Settings(redis_url=silent_url(), coalesce_ms=5.0))
    assert coalescers() == before + 1
    del client
    gc.collect()
    deadline = time.monotonic() + 10
    while coalescers() > before:  # its thread held it, so it was never collected and the thread never ended
        assert time.monotonic() < deadline, "the dropped client's coalescer thread lives on"
        time.sleep(0.05)
