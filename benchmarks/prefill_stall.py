"""How long a long prompt's prefill holds the rows already decoding, with and without chunked prefill.

    python -m benchmarks.prefill_stall [--chunks 0,256,512,1024] [--rounds 2] [--repeats 100] [--rows 4]

For each prefill chunk size (``INFERQ_BATCHING__GENERATE_PREFILL_CHUNK``; 0: whole prompts), alternating
over the rounds, it starts a worker from this tree (``--kinds generate``, the models of the settings in the
environment), starts ``--rows`` streamed greedy generations (counting, so they do not stop early), and once
each has streamed a few pieces sends one streamed request with a long prompt (``--repeats`` sentences,
about fourteen tokens each). Every stream is read with a bare XREAD, noting when each piece arrives. Prints, as
one JSON line per run: the decoding rows' longest gap between two pieces while the long prompt waited for
its first text (the stall it caused), their median gap outside that window (one ordinary step), the long
request's time to its first text, and the decoding rows' total time. It flushes the database of
``INFERQ_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from typing import Any

import redis

from benchmarks.sharing import _wait_ready
from producer.client import Client
from producer.contract import stream_key
from producer.settings import Settings

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


class _Reader:
    """Every stream it was given, read with one XREAD at a time: when each text piece arrived."""

    def __init__(self, store: redis.Redis) -> None:
        self.store = store
        self.pieces: dict[str, list[float]] = {}
        self.ended: set[str] = set()
        self._last: dict[str, bytes] = {}

    def add(self, task_id: str) -> None:
        self.pieces[task_id] = []
        self._last[stream_key(task_id)] = b"0-0"

    def read(self) -> None:
        open_streams = {key: last for key, last in self._last.items()
                        if key.removeprefix(stream_key("")) not in self.ended}
        if not open_streams:
            return
        reply: Any = self.store.xread(open_streams, block=50, count=100)  # type: ignore[arg-type]
        now = time.monotonic()
        for name, entries in reply or ():
            key = name.decode()
            task_id = key.removeprefix(stream_key(""))
            self._last[key] = entries[-1][0]
            for _, fields in entries:
                if fields[b"event"] == b"text":
                    self.pieces[task_id].append(now)
                elif fields[b"event"] in (b"end", b"error"):
                    self.ended.add(task_id)


def run_once(chunk: int, repeats: int, rows: int, row_tokens: int) -> dict[str, Any]:
    env = {**os.environ, "INFERQ_BATCHING__GENERATE_PREFILL_CHUNK": str(chunk)}
    client = Client(Settings(result_timeout=600))
    store = client.app.backend.client
    store.flushdb()
    node = f"prefill-{os.getpid()}-{chunk}@localhost"
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--kinds", "generate",
                               "--name", node], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(client, node, worker)
        client.generate("Hello", max_new_tokens=4)  # warm
        reader = _Reader(store)
        decoding = [client.submit_generate(f"{i}, {i + 1}, {i + 2},", max_new_tokens=row_tokens, stream=True).id
                    for i in range(rows)]
        for task_id in decoding:
            reader.add(task_id)
        while min(len(reader.pieces[task_id]) for task_id in decoding) < 5:
            reader.read()
        sent = time.monotonic()
        long = client.submit_generate(SENTENCE * repeats, max_new_tokens=8, stream=True)
        reader.add(long.id)
        while not reader.pieces[long.id]:
            if long.id in reader.ended:
                long.get()  # it failed without text: raises its error (a prompt over max_length, say)
            reader.read()
        first_text = reader.pieces[long.id][0]
        while len(reader.ended) < rows + 1:
            reader.read()
        result = long.get()
        stall: list[float] = []
        ordinary: list[float] = []
        for task_id in decoding:
            times = reader.pieces[task_id]
            for earlier, later in pairwise(times):
                (stall if later > sent and earlier < first_text else ordinary).append(later - earlier)
        return {"chunk": chunk, "prompt_tokens": result["prompt_tokens"],
                "stall_max_ms": round(max(stall, default=0.0) * 1000, 1),
                "ordinary_gap_p50_ms": round(statistics.median(ordinary) * 1000, 1),
                "long_first_text_ms": round((first_text - sent) * 1000, 1),
                "rows_total_s": round(max(reader.pieces[task_id][-1] for task_id in decoding) - sent, 2)}
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        store.flushdb()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="0,256,512,1024")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--row-tokens", type=int, default=120)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for chunk in (int(value) for value in args.chunks.split(",")):
            print(json.dumps(run_once(chunk, args.repeats, args.rows, args.row_tokens)), flush=True)


if __name__ == "__main__":
    main()
