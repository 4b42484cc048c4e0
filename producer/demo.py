"""``inferq demo``: one task of each kind through Redis and a real worker process, then stop it all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from producer.client import Client, Handle
from producer.errors import InferqError
from producer.settings import Settings, redact

PROMPT = [{"role": "user", "content": "In one sentence: what is the capital of France?"}]
CLASSIFY_TEXTS = ["The match went to extra time and the home side scored the winner.",
                  "Shares slid after the central bank raised interest rates."]
CLASSIFY_LABELS = ["sports", "finance", "cooking"]


def run_demo(settings: Settings, timeout: float) -> int:
    from workers.supervision.embedded_redis import start_if_absent  # needs the [worker] extra, like the demo itself

    embedded = start_if_absent(settings)
    print(f"Redis: {redact(settings.broker)}" + (" (embedded Valkey, started for this demo)" if embedded else ""))
    log = tempfile.NamedTemporaryFile(prefix="inferq-demo-worker-", suffix=".log", delete=False)  # noqa: SIM115
    node = f"demo-{os.getpid()}@{socket.gethostname()}"
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--name", node],
                              stdout=log, stderr=subprocess.STDOUT)
    print(f"worker: started {node} (pid {worker.pid}; log {log.name}); loading models...")
    client = Client(settings)
    try:
        handles: dict[str, Handle[Any]] = {
            "generate": client.submit_generate(messages=PROMPT, max_new_tokens=48),
            "classify": client.submit_classify(CLASSIFY_TEXTS, labels=CLASSIFY_LABELS, top_k=2),
            "embed": client.submit_embed(["inferq puts model inference behind a queue."]),
        }
        results = {kind: _wait(handle, worker, log.name, timeout) for kind, handle in handles.items()}
    except (InferqError, RuntimeError) as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(worker)
        client.close()
        if embedded:
            embedded.stop()
        print("stopped the worker" + (" and the embedded Redis" if embedded else ""))
    _show(results)
    return 0


def _wait(handle: Handle[Any], worker: subprocess.Popen[bytes], log_path: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not handle.ready():
        if worker.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                tail = "".join(log.readlines()[-15:])
            raise RuntimeError(f"the worker exited with code {worker.returncode}; its log ends:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no result within {timeout:g} s; the worker log is {log_path}")
        time.sleep(0.2)
    return handle.get(timeout=5)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: unfinished work goes back to the queue
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _show(results: dict[str, Any]) -> None:
    generated = results["generate"]
    print(f"\ngenerate ({generated['model']}): {PROMPT[0]['content']}")
    print(f"  -> {generated['text'].strip()!r}")
    print(f"     finish_reason={generated['finish_reason']}, prompt_tokens={generated['prompt_tokens']}, "
          f"completion_tokens={generated['completion_tokens']}")
    classified = results["classify"]
    print(f"\nclassify ({classified['model']}, zero-shot into {CLASSIFY_LABELS}):")
    for text, scores in zip(CLASSIFY_TEXTS, classified["results"], strict=True):
        shown = ", ".join(f"{s['label']} {s['score']:.3f}" for s in scores)
        print(f"  {text!r}\n    -> {shown}")
    embedded = results["embed"]
    vector = embedded["embeddings"][0]
    norm = sum(v * v for v in vector) ** 0.5
    print(f"\nembed ({embedded['model']}): dim={embedded['dim']}, L2 norm={norm:.4f}, "
          f"first values={[round(v, 4) for v in vector[:4]]}")
