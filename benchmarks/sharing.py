"""How long short requests wait while a long generation runs on the same worker.

    python -m benchmarks.sharing [--long-tokens 300] [--after 3] [--shorts 4] [--embeds 10]

Starts a worker from this tree (``--kinds embed,generate``, the models of the settings in the
environment), sends one long greedy generation (counting, so the model does not stop early), and
``--after`` seconds into it sends, at once: ``--shorts`` 4-token generations, and from another thread
``--embeds`` single-text embeds one after another, then one health check (``inferq check``'s
broadcast). Prints each latency, from send to answer, and the long generation's own, as JSON.
It flushes the database of ``INFERQ_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from producer.client import Client
from producer.health import check_workers
from producer.settings import Settings


def _wait_ready(client: Client, node: str, worker: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
        for reply in client.app.control.broadcast("inferq_status", reply=True, timeout=1.0, destination=[node]):
            if reply.get(node, {}).get("ready"):
                return
    raise SystemExit(f"the worker was not ready in {timeout:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-tokens", type=int, default=300)
    parser.add_argument("--after", type=float, default=3.0)
    parser.add_argument("--shorts", type=int, default=4)
    parser.add_argument("--embeds", type=int, default=10)
    args = parser.parse_args()
    client = Client(Settings(result_timeout=600))
    client.app.backend.client.flushdb()
    node = f"sharing-{os.getpid()}@localhost"
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--kinds", "embed,generate",
                               "--name", node], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(client, node, worker)
        client.generate("Hello", max_new_tokens=4)  # warm
        client.embed(["warm"])
        figures: dict[str, Any] = {"long_tokens": args.long_tokens, "after_s": args.after}
        started = time.monotonic()
        long = client.submit_generate("1, 2, 3, 4, 5, 6,", max_new_tokens=args.long_tokens)
        time.sleep(args.after)
        embeds: list[float] = []

        def embed_one_by_one() -> None:
            for i in range(args.embeds):
                sent = time.monotonic()
                client.embed([f"while it generates {i}"])
                embeds.append(round(time.monotonic() - sent, 3))

        thread = threading.Thread(target=embed_one_by_one)
        sent = time.monotonic()
        shorts = [client.submit_generate(f"Hi {i}", max_new_tokens=4) for i in range(args.shorts)]
        thread.start()
        short_s = []
        for handle in shorts:
            handle.get()
            short_s.append(round(time.monotonic() - sent, 3))
        thread.join()
        checked = time.monotonic()
        health = check_workers(client, [node], timeout=60)
        figures["check_s"] = round(time.monotonic() - checked, 3)
        figures["check_ok"] = [h.ok for h in health] == [True]
        figures["long_running_when_checked"] = not long.ready()
        completion = long.get()
        figures["long_s"] = round(time.monotonic() - started, 3)
        figures["long_completion_tokens"] = completion["completion_tokens"]
        figures["short_s"] = short_s
        figures["embed_s"] = embeds
        print(json.dumps(figures))
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        client.app.backend.client.flushdb()
        client.close()


if __name__ == "__main__":
    main()
