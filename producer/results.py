"""Reading a stored (or published) task result: what the worker's result backend writes, as Celery reads it.

Shared by the coalescer (a thread told of answers by pub/sub) and the gateway (an event loop told so too).
"""

from __future__ import annotations

from typing import Any

import orjson

FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def final_meta(backend: Any, value: bytes) -> dict[str, Any] | None:
    """A result's meta (status, result, ...) once the task is over; None for a state on the way."""
    try:
        decoded = orjson.loads(value)  # the worker writes plain JSON; 8x faster than the json module
    except orjson.JSONDecodeError:
        decoded = backend.decode(value)  # kombu's own form (NaN, tagged types): its reader
    meta: dict[str, Any] = backend.meta_from_decoded(decoded)
    return meta if meta["status"] in FINAL_STATES else None


def outcome(backend: Any, meta: dict[str, Any]) -> Any:
    """The result of a final meta, or its error raised as the task's own type (InvalidInput, ...)."""
    if meta["status"] == "SUCCESS":
        return meta["result"]
    raise backend.exception_to_python(meta["result"])
