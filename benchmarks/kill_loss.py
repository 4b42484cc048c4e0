"""How many messages a SIGKILLed worker loses while it drains a backlog (it must be none).

    INFERQ_REDIS_URL=redis://127.0.0.1:6379/5 INFERQ_MODELS__EMBED='{"tiny": {"source": "/tmp/tiny/bert"}}' \\
        python -m benchmarks.kill_loss --rounds 8

Each round flushes the database, starts `inferq worker --kinds embed`, pushes 4,000 raw messages, SIGKILLs
the worker once a few hundred results have landed (a little later each round), and looks for every task id
among the stored results, the queue and the unacknowledged messages. An id found nowhere was lost.
Flushes the database it is pointed at: never run it against one that matters.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.backlog import RESULT_PREFIX
from benchmarks.protocol import task_message
from producer.settings import Settings

BACKLOG = 4000


def one_round(store: redis.Redis, number: int, log: Path) -> tuple[int, int, int, int]:
    """(answered, queued, unacknowledged, lost) right after one kill."""
    store.flushdb()
    messages = [task_message("inferq.embed", "embed", {"texts": [f"kill {number}.{i}"]}) for i in range(BACKLOG)]
    keys = [RESULT_PREFIX + task_id for task_id, _ in messages]
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--kinds", "embed", "--name",
                                   f"kill-loss-{number}@%h"], stdout=out, stderr=subprocess.STDOUT)
    store.lpush("embed", *(entry for _, entry in messages))
    deadline = time.monotonic() + 180
    while sum(value is not None for value in store.mget(keys)) < 300 + 200 * number % 1500:
        if time.monotonic() > deadline or worker.poll() is not None:
            break
        time.sleep(0.01)
    time.sleep(number % 7 * 0.013)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    ids = {task_id for task_id, _ in messages}
    answered = {task_id for (task_id, _), value in zip(messages, store.mget(keys), strict=True) if value is not None}
    queued = {json.loads(entry)["headers"]["id"] for entry in store.lrange("embed", 0, -1)}
    held = {json.loads(value)[0]["headers"]["id"] for value in store.hvals("unacked")}
    return len(answered), len(queued), len(held), len(ids - answered - queued - held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    options = parser.parse_args()
    store = redis.Redis.from_url(Settings().broker)
    log = Path(tempfile.gettempdir()) / "inferq-kill-loss-worker.log"
    lost = 0
    try:
        for number in range(options.rounds):
            answered, queued, held, gone = one_round(store, number, log)
            lost += gone
            print(f"kill {number}: answered {answered}, queued {queued}, unacknowledged {held}, lost {gone}",
                  flush=True)
    finally:
        store.flushdb()
    print(f"lost in all: {lost}")


if __name__ == "__main__":
    main()
