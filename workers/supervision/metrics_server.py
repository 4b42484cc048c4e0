"""Serving a worker host's Prometheus metrics: one endpoint for every process of the host.

A launcher's device processes and receivers, or a single worker and its device process, each write their
samples to files in one folder (prometheus_client's multiprocess mode); the launcher, or the single worker,
serves ``/metrics`` with their sum. The folder must be named before any of them imports prometheus_client (it
decides where values live at import), so the command sets it first thing and the children inherit it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from producer.settings import Settings
from workers.errors import WorkerError

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
SERVED_BY = "INFERQ_METRICS_SERVED_BY"  # set for the children of the process that serves: they only write
log = logging.getLogger(__name__)


@contextmanager
def host_metrics(settings: Settings) -> Iterator[None]:
    """While inside: this process and the processes it starts write metrics to a fresh folder, served on
    ``metrics_port`` (nothing at all without one)."""
    if settings.metrics_port is None or SERVED_BY in os.environ:
        yield  # not served, or served by the process that started this one (the launcher): only written
        return
    if "prometheus_client" in sys.modules and MULTIPROC_DIR not in os.environ:
        raise WorkerError("prometheus_client was imported before the metrics folder was set: this process's "
                          "samples would never reach /metrics")
    folder = tempfile.mkdtemp(prefix="inferq-metrics-")
    os.environ[MULTIPROC_DIR] = folder
    os.environ[SERVED_BY] = str(os.getpid())
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
        try:
            start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
        except OSError as exc:
            raise WorkerError(f"cannot serve metrics on {settings.metrics_address}:{settings.metrics_port} "
                              f"(INFERQ_METRICS_PORT): {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)
        yield
    finally:
        del os.environ[SERVED_BY]
        shutil.rmtree(folder, ignore_errors=True)


def process_ended(pid: int) -> None:
    """Forget the live gauges (device memory) of a child that ended; its counters still count."""
    folder = os.environ.get(MULTIPROC_DIR)
    if folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
