"""The Redis result backend, storing each failure's message as one readable string.

Celery stores ``exc_message`` as the exception's argument list (``["texts must ..."]``). The contract
promises a plain string, which is what a foreign client or Flower shows best; Celery's own reader
accepts both forms, so producers need nothing special.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

from producer.errors import InferqError


class InferqRedisBackend(RedisBackend):  # type: ignore[misc]
    def prepare_exception(self, exc: BaseException, serializer: str | None = None) -> Any:
        prepared = super().prepare_exception(exc, serializer)
        if isinstance(exc, InferqError) and isinstance(prepared, dict):
            prepared["exc_message"] = exc.message
        return prepared


OVERRIDES = {
    "redis": "workers.backend:InferqRedisBackend",
    "rediss": "workers.backend:InferqRedisBackend",
}
