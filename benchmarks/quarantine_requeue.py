"""Redelivered messages that find the quarantine busy go back to their queue and are each answered once.

    HF_HUB_OFFLINE=1 python -m benchmarks.quarantine_requeue --redis redis://127.0.0.1:6379/12

Starts `inferq worker --gpus none --kinds generate` (SmolLM2) with a visibility timeout of 8 s and a generate
limit of 6 s, so a redelivered message waits for the quarantine max(1, (8 - 6) / 2) = 1 s. Then it pushes
`--messages` generate messages marked redelivered (as Kombu marks a restored one) onto the queue at once: one
holds the quarantine while it runs, the others go back to their queue after their wait, and come again. It
prints when each was answered, and the worker's `redelivered`, `already_answered` and `quarantine_full`
counts and the runs on the device; every message must be answered and run once, nothing left queued or
unacknowledged. A drill, not a test: its timing rides on SmolLM2's speed on the machine. Flushes the
database it is pointed at.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import redis

from producer.client import Client
from producer.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=120)
    args = parser.parse_args()
    store = redis.Redis.from_url(args.redis)
    store.flushdb()
    folder = Path(tempfile.mkdtemp(prefix="quarantine-"))
    config = folder / "inferq.toml"
    config.write_text("visibility_timeout = 8\nworker_concurrency = 8\n[time_limits]\nembed = 6\nclassify = 6\n"
                      "generate = 6\n[models]\nembed = {}\n")
    env = {**os.environ, "INFERQ_CONFIG": str(config), "INFERQ_REDIS_URL": args.redis}
    log_path = folder / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", "--kinds",
                                   "generate"], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(Settings(redis_url=args.redis, result_timeout=120))
    try:
        client.generate("warm up", max_new_tokens=4)  # the worker is up
        before = _status(client)["counts"].get("generate/smollm2:requests", 0)
        ids = []
        for i in range(args.messages):
            parked = client.app.send_task("inferq.generate", queue="parked", kwargs={
                "prompt": f"Tell me a long story about dragon {i}", "max_new_tokens": args.new_tokens,
                "temperature": 0})
            message = json.loads(cast(bytes, store.rpop("parked")))
            message["headers"]["redelivered"] = True
            message["properties"]["delivery_info"].update(redelivered=True, routing_key="generate")
            ids.append(parked.id)
            store.lpush("generate", json.dumps(message))
        started = time.monotonic()
        for task_id in ids:
            result = client.handle(task_id).get(timeout=120)
            print(f"{task_id[:8]} answered at {time.monotonic() - started:.1f} s ({result['finish_reason']})")
        time.sleep(10)  # past another visibility timeout: nothing comes back
        status = _status(client)
        print({key: status[key] for key in ("redelivered", "already_answered", "quarantine_full")})
        runs = int(status["counts"].get("generate/smollm2:requests", 0)) - int(before)
        print(f"runs on the device: {runs} for {args.messages} messages")
        print(f"left: {store.llen('generate')} queued, {store.hlen('unacked')} unacknowledged; "
              f"worker log: {log_path}")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        client.close()
        store.flushdb()


def _status(client: Client) -> dict[str, Any]:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=2)
    return cast(dict[str, Any], next(iter(replies[0].values())))


if __name__ == "__main__":
    main()
