"""What a task-sent event costs the producer: CPU time per send_task with task_sent_events off and on.

    python benchmarks/send_cost.py --redis redis://127.0.0.1:6379/10 --messages 3000

Sends to the embed queue of a database no worker reads, then deletes what it sent. CPU time (not wall
time) of this process, so a busy machine changes it little.
"""

from __future__ import annotations

import argparse
import platform
import time

import redis

from producer.app import make_celery
from producer.contract import queue_name, task_name
from producer.settings import Settings


def cpu_ms_per_send(url: str, sent_events: bool, messages: int) -> float:
    app = make_celery(Settings(redis_url=url, task_sent_events=sent_events), "send-cost")
    try:
        for _ in range(50):  # connections and caches warm
            app.send_task(task_name("embed"), kwargs={"texts": ["warm"]}, queue=queue_name("embed"))
        started = time.process_time()
        for i in range(messages):
            app.send_task(task_name("embed"), kwargs={"texts": [f"text {i}"]}, queue=queue_name("embed"))
        return (time.process_time() - started) * 1000 / messages
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = redis.Redis.from_url(args.redis)
    print(f"{platform.node()} ({platform.processor() or platform.machine()}), {args.messages} sends, best of "
          f"{args.repeats}")
    try:
        for sent_events in (False, True):
            best = min(cpu_ms_per_send(args.redis, sent_events, args.messages) for _ in range(args.repeats))
            print(f"task_sent_events={str(sent_events).lower():<5}  {best:.3f} ms CPU per send_task")
    finally:
        store.flushdb()
        store.close()


if __name__ == "__main__":
    main()
