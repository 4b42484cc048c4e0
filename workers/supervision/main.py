"""Start one inferq worker process on this machine's device, or a launcher that supervises one per GPU."""

from __future__ import annotations

import logging
import os
import socket

from celery.utils.nodenames import host_format

from producer.contract import queue_name
from producer.settings import Kind, Settings, redact
from workers import logs
from workers.supervision.launcher import Launcher, plan_slots, visible_gpus


def run_worker(settings: Settings, kinds: tuple[Kind, ...], concurrency: int | None = None,
               node_name: str | None = None) -> None:
    from workers.receiving.app import WorkerApp  # torch comes in here, in the worker process only

    node_name = host_format(node_name or f"inferq@{socket.gethostname()}")  # expands %h, %n, %d as Celery does
    logs.configure(settings.log_level, node_name)
    logging.getLogger(__name__).info("broker %s, results %s", redact(settings.broker), redact(settings.backend))
    if settings.log_level.upper() != "DEBUG":
        # One "received" and one "succeeded" line per message (with a repr of the result) is noise at
        # thousands of messages a second, and costs the worker's CPU; task events and Flower count them.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    app = WorkerApp(settings, kinds)
    argv = [
        "worker",
        # threads: the models load once in this process and are shared; no fork ever happens.
        "--pool", "threads",
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--queues", ",".join(queue_name(kind) for kind in kinds),
        "--hostname", node_name,
        "--loglevel", settings.log_level.upper(),
        "--without-mingle", "--without-gossip",
    ]
    app.celery.worker_main(argv)


def run_launcher(settings: Settings, kinds: tuple[Kind, ...], gpus: str, replicas: int,
                 concurrency: int | None = None) -> int:
    """Supervise one worker per GPU (or `replicas` CPU workers) until SIGTERM or Ctrl-C."""
    logs.configure(settings.log_level, "launcher")
    slots = plan_slots(gpus, replicas, socket.gethostname(), visible_gpus)
    # Warm shutdown lets running tasks finish; none may run longer than its kind's limit.
    grace = settings.time_limits.longest + 10
    cores = os.cpu_count() or 1
    launcher = Launcher(slots, kinds, concurrency, grace, torch_threads=max(1, cores // len(slots)))
    logging.getLogger("inferq.launcher").info("supervising %s for %s", ", ".join(s.name for s in slots),
                                              ",".join(kinds))
    return launcher.run()
