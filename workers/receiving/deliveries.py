"""Poison messages: a message whose worker dies each time it runs is not handed out forever.

Redis gives a delivered, unacknowledged message to another worker after the visibility timeout, and Kombu
marks it ``redelivered``. Such a message runs in quarantine: one redelivered message at a time per worker
(fresh messages are not held up), with a counter ``inferq:deliveries:<task id>`` on the broker's Redis
raised before it runs and deleted once it finished without killing its worker. So a counter that keeps
growing belongs to a message that was running, alone among the redelivered ones, each time its worker
died, and not to the messages that were merely prefetched beside it. Past ``max_deliveries`` the message
fails with PoisonMessage without running, and is kept in the dead-letter list with the reason. First
deliveries, the normal path, cost nothing.

A worker can also die after it stored a result and before it acknowledged the message. The redelivered
message then finds its SUCCESS stored: it is not run again, and the stored result is its answer (the
result backend never overwrites a SUCCESS either, so a caller can never see two different answers).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

from producer.errors import PoisonMessage
from workers.receiving import dead_letter
from workers.receiving.counters import SharedCounter

KEY = "inferq:deliveries:{}"
_quarantine = threading.Lock()
_counts = SharedCounter("redelivered", "already_answered")


def redelivery_counts() -> dict[str, int]:
    """Redelivered messages this worker received, and how many of them an earlier delivery had answered."""
    return _counts.snapshot()


@contextmanager
def quarantined(app: Celery, request: Any, max_deliveries: int, keep_seconds: int,
                wait: float) -> Iterator[Any | None]:
    """Around one task run: raises PoisonMessage instead of running a message delivered too often.

    Yields the result an earlier delivery of the message already stored (run nothing then), or None."""
    info = request.delivery_info or {}
    if not info.get("redelivered"):
        yield None
        return
    _counts.add("redelivered")
    earlier = app.backend.get_task_meta(request.id, cache=False)
    if earlier.get("status") == "SUCCESS":
        _counts.add("already_answered")
        yield earlier.get("result")
        return
    # Bounded: a redelivered message that cannot get the quarantine in time runs beside another one.
    alone = _quarantine.acquire(timeout=wait)
    try:
        earlier = app.backend.get_task_meta(request.id, cache=False)
        if earlier.get("status") == "SUCCESS":  # another delivery of it answered while this one waited
            _counts.add("already_answered")
            yield earlier.get("result")
            return
        key = KEY.format(request.id)
        with app.pool.acquire(block=True) as connection:
            client = connection.default_channel.client
            with client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, keep_seconds)
                redeliveries = int(pipe.execute()[0])
            if redeliveries + 1 > max_deliveries:
                _bury(client, request, info, redeliveries + 1, max_deliveries)
        yield None
        with app.pool.acquire(block=True) as connection:
            connection.default_channel.client.delete(key)  # it ran to the end: it is not what killed a worker
    finally:
        if alone:
            _quarantine.release()


def _bury(client: Any, request: Any, info: dict[str, Any], deliveries: int, max_deliveries: int) -> None:
    reason = (f"delivered {deliveries} times, and the worker running it died each time (max_deliveries = "
              f"{max_deliveries})")
    raw = json.dumps({"task": request.task, "id": request.id, "args": list(request.args or ()),
                      "kwargs": request.kwargs or {}}, default=repr)
    dead_letter.record(client, reason, info.get("routing_key"), raw, request.id)
    raise PoisonMessage(f"the message was {reason}; it is not run again and is kept in {dead_letter.DEAD_LETTER_KEY}")
