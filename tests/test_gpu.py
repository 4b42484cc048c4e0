"""On a CUDA device: models load there in half precision and agree with the CPU; the launcher pins one
worker to each GPU. Skipped without CUDA (benchmarks/gpu_workers.sh runs them on a lent GPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import redis
import torch

from producer.client import Client
from producer.settings import ModelRegistry, Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, ROOT, stop
from tests.test_launcher import Launched
from workers.device.runtime import Runtime
from workers.supervision.launcher import visible_gpus

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = ["A cat sits on the mat.", "Stock markets fell sharply today.", "Knead the dough."]


def only(kind: str) -> ModelRegistry:
    """The configured registry (INFERQ_MODELS__* on a GPU machine), with the other kinds left out."""
    return Settings().models.model_copy(update={k: {} for k in ("embed", "classify", "generate") if k != kind})


def test_embed_on_cuda_matches_cpu_in_half_precision() -> None:
    registry = only("embed")
    gpu = Runtime(Settings(models=registry, device="cuda"), ("embed",))
    cpu = Runtime(Settings(models=registry, device="cpu"), ("embed",))
    try:
        gpu.load()
        cpu.load()
        described = gpu.describe()["models"]["embed"]["minilm"]
        assert described["device"].startswith("cuda")
        assert described["dtype"] in ("bfloat16", "float16")
        on_gpu = torch.tensor(gpu.handle("embed", (), {"texts": TEXTS})["embeddings"])  # type: ignore[typeddict-item]
        on_cpu = torch.tensor(cpu.handle("embed", (), {"texts": TEXTS})["embeddings"])  # type: ignore[typeddict-item]
    finally:
        gpu.close()
        cpu.close()
    cosine = (on_gpu * on_cpu).sum(-1)
    assert bool((cosine > 0.99).all()), cosine


def test_generate_on_cuda() -> None:
    runtime = Runtime(Settings(models=only("generate"), device="cuda"), ("generate",))
    try:
        runtime.load()
        result = runtime.handle("generate", (), {"prompt": "The capital of France is", "max_new_tokens": 8})
    finally:
        runtime.close()
    assert result["completion_tokens"] >= 1  # type: ignore[typeddict-item]


def test_a_device_side_error_is_the_accelerator_error_the_device_loop_stops_on() -> None:
    """The device loop takes torch.AcceleratorError for a broken device (workers/device/loop.py); a
    device-side assert must raise it. In a process of its own: the assert spoils CUDA for its process."""
    code = ("import torch\n"
            "try:\n"
            "    torch.zeros(2, device='cuda')[torch.tensor([5], device='cuda')].sum().item()\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, isinstance(exc, torch.AcceleratorError))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["AcceleratorError", "True"], done.stdout + done.stderr


def test_the_launcher_pins_one_worker_to_each_gpu_in_half_precision() -> None:
    gpus = visible_gpus()
    assert gpus, "nvidia-smi lists no GPU on a machine where torch sees CUDA"
    nodes = [f"gpu{gpu}@{socket.gethostname()}" for gpu in gpus]
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/5"
    env = {**os.environ, "INFERQ_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "gpu-launcher.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "all", "--kinds",
                                    "embed,generate"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    client = Client(Settings(redis_url=url))
    launched = Launched(process, log_path, client, nodes)
    try:
        ready = launched.wait_ready(nodes, timeout=300)
        for node in nodes:
            status = ready[node]
            assert status["device"] == "cuda:0"  # each child sees only its own GPU
            assert status["models"]["embed"]["minilm"]["dtype"] in ("bfloat16", "float16")
            assert status["memory_allocated_mib"] > 0
        assert "warm-up" in launched.log() and "MiB GPU memory allocated" in launched.log()
        check = subprocess.run([sys.executable, "-m", "producer.cli", "check", "--local", "--expect", str(len(nodes))],
                               env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert check.returncode == 0, check.stderr
        pid = ready[nodes[0]]["pid"]
        os.kill(pid, signal.SIGKILL)
        launched.wait_ready([nodes[0]], timeout=300, not_pid=pid)
        assert client.embed(["back on the GPU"])["dim"] > 0
    finally:
        try:
            stop(process, 120)
        finally:
            client.close()
            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=5).flushdb()
    assert process.returncode == 0  # a clean exit on SIGTERM
