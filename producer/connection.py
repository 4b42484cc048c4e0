"""Turning Redis and Kombu connection failures into the one error a producer's caller catches."""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.errors import InferqConnectionError

_CONNECTION_ERRORS = (OperationalError, RedisConnectionError, RedisTimeoutError, ConnectionError)


def broadcast(app: Any, command: str, **kwargs: Any) -> list[dict[str, Any]]:
    """``app.control.broadcast``, once more if a connection fails: after a Redis restart or a Sentinel failover
    the producer's pooled connections reach a server that is gone or no longer the master, and fail once."""
    try:
        replies: list[dict[str, Any]] = app.control.broadcast(command, **kwargs)
    except _CONNECTION_ERRORS:
        replies = app.control.broadcast(command, **kwargs)
    return replies


class ConnectionErrors:
    """Turns Redis/Kombu connection failures into one clear InferqConnectionError."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, _CONNECTION_ERRORS):
            raise InferqConnectionError(f"could not reach {self._what}: {exc}") from exc
        # Celery's Redis result backend subscribes to the result before publishing and, when it cannot
        # reconnect, raises a bare RuntimeError with this text.
        if isinstance(exc, RuntimeError) and "Celery result store" in str(exc):
            raise InferqConnectionError(f"could not reach {self._what}: the result backend did not answer "
                                        "after retries") from exc
