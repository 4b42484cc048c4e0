"""Start one inferq worker process on this machine's device, or a launcher that supervises one per GPU."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile

from celery.utils.nodenames import host_format

from producer.contract import queue_name
from producer.settings import Kind, Settings, redact
from workers import logs
from workers.errors import WorkerError
from workers.supervision.launcher import (
    Launcher,
    LaunchError,
    default_receivers,
    die_with_launcher,
    plan_slots,
    split_slots,
    visible_gpus,
)
from workers.supervision.metrics_server import host_metrics


def run_worker(settings: Settings, kinds: tuple[Kind, ...], concurrency: int | None = None,
               node_name: str | None = None) -> None:
    die_with_launcher()
    with host_metrics(settings):  # before the worker's modules import prometheus_client
        _run_worker(settings, kinds, concurrency, node_name)


def _run_worker(settings: Settings, kinds: tuple[Kind, ...], concurrency: int | None,
                node_name: str | None) -> None:
    from workers.receiving.app import WorkerApp  # torch comes in here, in the worker process only

    # The Rust tokenizer spreads even a one-text call over a thread pool whose threads spin for work: a
    # single-text call cost 34 us of CPU with it, 26 without (this CPU). A worker's parallelism is its
    # receivers (one per core); set TOKENIZERS_PARALLELISM=true to give it back to the tokenizer.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


def run_launcher(settings: Settings, kinds: tuple[Kind, ...], gpus: str, replicas: int | None = None,
                 concurrency: int | None = None, receivers: int | None = None) -> int:
    """Supervise one worker per GPU (or `replicas` CPU workers), or per device a device process and its
    `receivers`, until SIGTERM or Ctrl-C."""
    logs.configure(settings.log_level, "launcher")
    log = logging.getLogger("inferq.launcher")
    if receivers is not None and replicas is not None:  # even --replicas 1: asked for, it cannot be had
        raise LaunchError("--replicas starts whole CPU workers, each with its own models; --receivers shares one "
                          "device process between receivers: use one or the other")
    slots = plan_slots(gpus, replicas, socket.gethostname(), visible_gpus)
    cores = os.cpu_count() or 1
    on_gpus = bool(slots) and slots[0].device != "cpu"
    devices = len(slots)
    if receivers is None and on_gpus:
        receivers = default_receivers(cores, devices)
        log.info("%d receivers per GPU (chosen from %d cores for %d GPUs; --receivers to choose)", receivers, cores,
                 devices)
    folder = None
    if receivers is not None:
        # the sockets live where only this user can reach them; the key keeps out any other process anyway
        folder = tempfile.mkdtemp(prefix="inferq-")
        slots = split_slots(slots, receivers, folder)
    # Warm shutdown lets running tasks finish; none may run longer than its kind's limit.
    grace = settings.time_limits.longest + 10
    # CPU devices share the cores: whole workers split them; a device process leaves one to each receiver
    torch_threads = max(1, cores // devices - (receivers or 0))
    launcher = Launcher(slots, kinds, concurrency, grace, torch_threads=torch_threads)
    log.info("supervising %s for %s", ", ".join(s.name for s in slots), ",".join(kinds))
    try:
        with host_metrics(settings):
            return launcher.run()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def run_device_server_process(settings: Settings, kinds: tuple[Kind, ...], listen: str, name: str) -> None:
    """`inferq device-server`: the device process of receivers on this host (the launcher starts one per
    device for --receivers; or start it by hand, with the same INFERQ_DEVICE_SERVER_KEY as its workers)."""
    die_with_launcher()
    from workers.device.server import run_device_server  # torch comes in here

    logs.configure(settings.log_level, name)
    key = settings.device_server_key
    if key is None:
        raise WorkerError("inferq device-server needs INFERQ_DEVICE_SERVER_KEY: the key its workers send")
    run_device_server(settings, kinds, listen, key.get_secret_value().encode())
