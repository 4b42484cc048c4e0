"""Errors of the worker itself (configuration, loading); request errors live in producer.errors."""

from __future__ import annotations


class WorkerError(Exception):
    """The worker cannot start or serve as configured."""


class ModelLoadError(WorkerError):
    """A configured model could not be found or loaded."""


class ResultNotStored(Exception):
    """The result backend refused to store a task's outcome (READONLY during a failover, OOM under maxmemory,
    MISCONF, or still unreachable after the retries): its message stays unacknowledged and comes back after the
    visibility timeout, to run again once Redis takes writes."""
