"""Errors of the worker itself (configuration, loading); request errors live in producer.errors."""

from __future__ import annotations

from celery.exceptions import Reject


class WorkerError(Exception):
    """The worker cannot start or serve as configured."""


class ModelLoadError(WorkerError):
    """A configured model could not be found or loaded."""


class ResultNotStored(Exception):
    """The result backend refused to store a task's outcome (READONLY during a failover, OOM under maxmemory,
    MISCONF, or still unreachable after the retries): its message stays unacknowledged and comes back after the
    visibility timeout, to run again once Redis takes writes."""


class QuarantineFull(Reject):  # type: ignore[misc]
    """A redelivered message waited as long as it may for the quarantine, which another redelivered message
    holds: it goes back to the end of its queue (``requeue``), uncounted, and waits again on its next delivery
    (workers/receiving/deliveries.py)."""

    def __init__(self, reason: str, requeue: bool = True) -> None:  # both: Reject's args, which unpickling passes
        super().__init__(reason, requeue=requeue)
