"""Errors of the worker itself (configuration, loading); request errors live in producer.errors."""

from __future__ import annotations


class WorkerError(Exception):
    """The worker cannot start or serve as configured."""


class ModelLoadError(WorkerError):
    """A configured model could not be found or loaded."""
