"""Where a worker's CPU goes, thread by thread, while it drains a raw-client backlog.

    python -m benchmarks.thread_cpu --messages 10000            # one `inferq worker --kinds embed`
    INFERQ_TORCH_THREADS=1 python -m benchmarks.thread_cpu       # the same with one torch thread

Starts a worker on INFERQ_REDIS_URL with the current settings, pushes the backlog (``benchmarks/protocol.py``
messages), reads each thread's CPU from /proc/<pid>/task before and after, and names the threads from a
``py-spy dump`` taken mid-drain (py-spy must be installed; threads it does not name, such as torch's OpenMP
workers, are summed as "native/other"). Prints microseconds of CPU per message for each.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.backlog import PUSH_CHUNK, RESULT_PREFIX, stat_cpu, wait_for
from benchmarks.protocol import task_message
from producer.settings import Settings


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of ``pid``, by thread id."""
    tasks = {task.name: stat_cpu(task / "stat") for task in Path(f"/proc/{pid}/task").iterdir()}
    return {tid: cpu for tid, cpu in tasks.items() if cpu is not None}


def thread_names(pid: int) -> dict[str, str]:
    """Thread id -> Python thread name, from py-spy (empty without it)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {match.group(1): match.group(2) for match in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10000)
    options = parser.parse_args()
    settings = Settings()
    broker, backend = redis.Redis.from_url(settings.broker), redis.Redis.from_url(settings.backend)
    log = Path(tempfile.gettempdir()) / "inferq-thread-cpu-worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--kinds", "embed", "--name",
                                   "thread-cpu@%h"], stdout=out, stderr=subprocess.STDOUT)
    while "ready." not in log.read_text(errors="replace"):
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}; see {log}")
        time.sleep(0.5)
    messages = [task_message("inferq.embed", "embed", {"texts": [f"a short sentence about queues {i}"]})
                for i in range(options.messages)]
    keys = [RESULT_PREFIX + task_id for task_id, _ in messages]
    before, started = thread_cpu(worker.pid), time.perf_counter()
    for at in range(0, len(messages), PUSH_CHUNK):
        broker.lpush("embed", *(entry for _, entry in messages[at:at + PUSH_CHUNK]))
    time.sleep(2)
    names = thread_names(worker.pid)
    missing = wait_for(backend, keys, time.perf_counter() + 1800)
    elapsed, after = time.perf_counter() - started, thread_cpu(worker.pid)
    worker.terminate()
    worker.wait(timeout=60)
    by_name: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, "native/other")
        by_name[name] = by_name.get(name, 0.0) + cpu - before.get(tid, 0.0)
    total = sum(by_name.values())
    count = len(messages)
    print(f"{count} messages in {elapsed:.1f} s ({count / elapsed:.0f}/s, {missing} unanswered); worker CPU "
          f"{total / count * 1e6:.0f} us per message")
    for name, cpu in sorted(by_name.items(), key=lambda item: -item[1]):
        if cpu > 0:
            print(f"  {name:<22}{cpu / count * 1e6:>8.0f} us per message")
    for at in range(0, len(keys), 1000):
        backend.delete(*keys[at:at + 1000])


if __name__ == "__main__":
    main()
