"""`inferq worker --gpus none --receivers 3`: one device process holds the models, three receivers (more
than this machine's two cores) take, tokenise and answer messages, and every model pass runs in the device
process. A receiver killed mid-load, or the device process killed mid-load, loses no message, and every
message ends with its own right answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.protocol import task_message
from producer.client import Client
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, ROOT, free_port, whereabouts_report, worker_env

pytestmark = pytest.mark.integration
DB = 8  # the device process's database (tests/test_device_process.py flushes it too; the two never overlap)
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
HOST = socket.gethostname()
NODES = [f"cpu0-r{i}@{HOST}" for i in (1, 2, 3)]


class Receivers:
    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, client: Client,
                 store: redis.Redis, metrics_port: int) -> None:
        self.process, self.log_path, self.client, self.store = process, log_path, client, store
        self.metrics_port = metrics_port

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The launcher's /metrics: (sample name, its labels) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 180, not_pids: frozenset[int] = frozenset()) -> dict[str, dict[str, Any]]:
        """Every receiver answering inferq_status as ready, each from a process not in `not_pids`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the launcher exited:\n{self.log()[-3000:]}"
            replies = self.client.app.control.broadcast("inferq_status", reply=True, timeout=1.0,
                                                        destination=NODES)
            ready = {node: answer for reply in replies for node, answer in reply.items() if answer.get("ready")}
            if all(node in ready and ready[node]["pid"] not in not_pids for node in NODES):
                return ready
        raise AssertionError(f"{NODES} not ready in {timeout} s:\n{self.log()[-4000:]}")

    def load(self, count: int, tag: str) -> tuple[list[str], list[str]]:
        """`count` single-text embed messages, each with its own text, pushed at once; their ids and texts."""
        texts = [f"{tag} message {i}" for i in range(count)]
        messages = [task_message("inferq.embed", "embed", {"texts": [text]}) for text in texts]
        self.store.lpush("embed", *(entry for _, entry in messages))
        return [task_id for task_id, _ in messages], texts

    def answered(self, ids: list[str]) -> int:
        return sum(v is not None for v in self.store.mget([f"celery-task-meta-{i}" for i in ids]))

    def wait_answered(self, ids: list[str], at_least: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.answered(ids) < at_least:
            assert time.monotonic() < deadline, (f"{self.answered(ids)} of {at_least} answered; "
                                                 f"{whereabouts_report(self.store, ids, ('embed',))}\n"
                                                 f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def check_answers(self, ids: list[str], texts: list[str]) -> None:
        """Every message succeeded, and with its own text's vector: a sample is embedded again and must
        match exactly (one device process, one model: the same text always gets the same vector)."""
        stored = self.store.mget([f"celery-task-meta-{i}" for i in ids])
        results = [json.loads(v) for v in stored if v is not None]
        assert len(results) == len(ids), f"{len(ids) - len(results)} of {len(ids)} have no result"
        failures = [r["result"] for r in results if r["status"] != "SUCCESS"]
        assert not failures, f"{len(failures)} of {len(ids)} failed, e.g. {failures[:3]}"
        vectors = [r["result"]["embeddings"][0] for r in results]
        assert len({tuple(v) for v in vectors}) == len(ids), "two messages got the same answer"
        sample = list(range(0, len(ids), max(1, len(ids) // 40)))
        again = [vector for at in range(0, len(sample), 8)  # within any max_texts the suite's settings set
                 for vector in self.client.embed([texts[i] for i in sample[at:at + 8]])["embeddings"]]
        assert all(max(abs(a - b) for a, b in zip(vectors[i], fresh, strict=True)) < 1e-5
                   for i, fresh in zip(sample, again, strict=True))


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Receivers]:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path_factory.mktemp("receivers") / "inferq.toml"
    # short limits and visibility timeout: held messages come back within seconds of a kill
    config.write_text(f"""
visibility_timeout = 6
[time_limits]
embed = 5
classify = 5
generate = 5
[models.embed.tiny]
source = {json.dumps(str(tiny_models["classifier"]))}
max_length = 64
[models.generate.tiny-lm]
source = {json.dumps(str(tiny_models["lm"]))}
max_length = 128
""")
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "receivers-launcher.log"
    metrics_port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", "--receivers",
                                    "3", "--kinds", "embed,generate"],
                                   env=worker_env(config, URL, INFERQ_METRICS_PORT=str(metrics_port)), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
    client = Client(Settings(redis_url=URL, result_timeout=60))
    launched = Receivers(process, log_path, client, store, metrics_port)
    try:
        launched.wait_ready()
        yield launched
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=90)
        client.close()
        store.flushdb()
        store.close()


def test_three_receivers_on_two_cores_share_one_device_process(receivers: Receivers) -> None:
    status = receivers.wait_ready()
    assert len({answer["pid"] for answer in status.values()}) == 3
    [device_pid] = {answer["device_process"]["pid"] for answer in status.values()}
    assert device_pid not in {answer["pid"] for answer in status.values()}
    # the weights are loaded once, in the device process; each receiver loaded tokenizers only
    assert all(answer["load_counts"] == {"embed/tiny": 1, "generate/tiny-lm": 1} for answer in status.values())
    before = {node: answer["paths"].get("fast_path", 0) for node, answer in status.items()}
    ids, texts = receivers.load(3000, "shared")
    receivers.wait_answered(ids, len(ids), timeout=120)
    receivers.check_answers(ids, texts)
    after = receivers.wait_ready()
    assert all(after[node]["paths"].get("fast_path", 0) > before[node] for node in NODES), \
        f"a receiver took no messages: {before} -> { {n: a['paths'] for n, a in after.items()} }"
    # the device process batched across receivers: its batches hold more than one request on average
    counts = after[NODES[0]]["device_process"]["counts"]
    assert counts["embed/tiny:requests"] > counts["embed/tiny:batches"]
    # generation runs there too, seeded sampling as reproducible as on a whole worker
    first = receivers.client.generate(prompt="hello there", max_new_tokens=8, temperature=0.8, seed=7)
    second = receivers.client.generate(prompt="hello there", max_new_tokens=8, temperature=0.8, seed=7)
    assert first["completion_tokens"] >= 1 and first["text"] == second["text"]
    # the launcher's /metrics sums its children's: the device process ran every batch, so what it shows came
    # from another process; the receivers' health checks may add a few requests
    metrics = receivers.metrics()
    embed, generate = (("model", "embed/tiny"),), (("model", "generate/tiny-lm"),)
    assert metrics[("inferq_requests_total", (*embed, ("outcome", "ok")))] >= len(ids)
    assert metrics[("inferq_batch_requests_sum", embed)] >= len(ids) > metrics[("inferq_batch_requests_count", embed)]
    assert metrics[("inferq_queue_wait_seconds_count", embed)] >= len(ids)
    assert metrics[("inferq_device_busy_seconds_total", embed)] > 0
    assert metrics[("inferq_generated_tokens_total", generate)] >= first["completion_tokens"] * 2
    assert metrics[("inferq_time_to_first_token_seconds_count", generate)] >= 2


def test_a_receiver_killed_mid_load_loses_nothing(receivers: Receivers) -> None:
    status = receivers.wait_ready()
    doomed = status[NODES[1]]["pid"]
    ids, texts = receivers.load(6000, "receiver-kill")
    receivers.wait_answered(ids, 300, timeout=60)
    os.kill(doomed, signal.SIGKILL)
    assert receivers.answered(ids) < len(ids), "the load was answered before the kill; nothing was tested"
    assert receivers.store.hlen("unacked") > 0, "nothing was held unacknowledged at the kill; nothing was tested"
    # the launcher restarts it; what it held comes back after the visibility timeout
    receivers.wait_answered(ids, len(ids), timeout=150)
    receivers.check_answers(ids, texts)
    restarted = receivers.wait_ready(not_pids=frozenset({doomed}))
    assert "cpu0-r2" in receivers.log() and restarted[NODES[0]]["pid"] == status[NODES[0]]["pid"]


def test_the_device_process_killed_mid_load_loses_nothing(receivers: Receivers) -> None:
    status = receivers.wait_ready()
    device_pid = status[NODES[0]]["device_process"]["pid"]
    ids, texts = receivers.load(6000, "device-kill")
    receivers.wait_answered(ids, 300, timeout=60)
    os.kill(device_pid, signal.SIGKILL)
    assert receivers.answered(ids) < len(ids), "the load was answered before the kill; nothing was tested"
    assert receivers.store.hlen("unacked") > 0, "nothing was held unacknowledged at the kill; nothing was tested"
    # its receivers go down with it, holding messages unacknowledged; all restart, and answer everything
    after = receivers.wait_ready(timeout=240, not_pids=frozenset(answer["pid"] for answer in status.values()))
    assert {answer["device_process"]["pid"] for answer in after.values()} != {device_pid}
    receivers.wait_answered(ids, len(ids), timeout=150)
    receivers.check_answers(ids, texts)
    assert "the device process is gone" in receivers.log()
