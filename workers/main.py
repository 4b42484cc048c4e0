"""Start one inferq worker process on this machine's device (CUDA when present, else CPU)."""

from __future__ import annotations

import logging
import socket

from producer.contract import queue_name
from producer.settings import Kind, Settings, redact
from workers.app import WorkerApp


def run_worker(settings: Settings, kinds: tuple[Kind, ...], concurrency: int | None = None,
               node_name: str | None = None) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
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
        "--hostname", node_name or f"inferq@{socket.gethostname()}",
        "--loglevel", settings.log_level.upper(),
        "--without-mingle", "--without-gossip",
    ]
    app.celery.worker_main(argv)
