"""Poison messages: a message whose worker dies each time it runs is not handed out forever.

Redis gives a delivered, unacknowledged message to another worker after the visibility timeout, and Kombu
marks it ``redelivered``. Such a message runs in quarantine: one redelivered message at a time per worker
(fresh messages are not held up), with a counter ``inferq:deliveries:<task id>`` on the broker's Redis
raised before it runs and deleted once it finished without killing its worker. So a counter that keeps
growing belongs to a message that was running, alone among the redelivered ones, each time its worker
died, and not to the messages that were merely prefetched beside it. Past ``max_deliveries`` the message
fails with PoisonMessage without running, and is kept in the dead-letter list with the reason. First
deliveries, the normal path, cost nothing.

A redelivered message waits for the quarantine only as long as its run still ends within the visibility
timeout (``quarantine_wait``). One that waited that long goes back to the end of its queue, uncounted, and
waits again on its next delivery: running it beside the other would break the quarantine, and running it
after a longer wait would let Redis hand it out again while it runs, to run twice at once.

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
from workers.errors import QuarantineFull
from workers.receiving import dead_letter
from workers.receiving.counters import SharedCounter

KEY = "inferq:deliveries:{}"
_quarantine = threading.Lock()
_counts = SharedCounter("redelivered", "already_answered", "quarantine_full")
# A floor, so that a visibility timeout barely above a time limit does not turn waiting into a busy loop of
# messages going back to their queue and coming straight back.
MIN_WAIT_S = 1.0


def redelivery_counts() -> dict[str, int]:
    """Redelivered messages this worker received, how many of them an earlier delivery had answered, and how
    many went back to their queue because the quarantine stayed busy."""
    return _counts.snapshot()


def quarantine_wait(visibility_timeout: float, time_limit: float) -> float:
    """How long a redelivered message may wait for the quarantine: half of what the visibility timeout leaves
    beyond its run (the other half is for the time it spent prefetched before it started), and never more
    than one run of the message holding it."""
    return max(MIN_WAIT_S, min(time_limit, (visibility_timeout - time_limit) / 2))


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
    if not _quarantine.acquire(timeout=wait):
        _counts.add("quarantine_full")
        raise QuarantineFull(f"redelivered message {request.id} waited {wait:g} s for the quarantine, which "
                             "another redelivered message holds; it goes back to its queue, so that its run, when "
                             "it comes, ends within the visibility timeout")
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
        _quarantine.release()


def _bury(client: Any, request: Any, info: dict[str, Any], deliveries: int, max_deliveries: int) -> None:
    reason = (f"delivered {deliveries} times, and the worker running it died each time (max_deliveries = "
              f"{max_deliveries})")
    raw = json.dumps({"task": request.task, "id": request.id, "args": list(request.args or ()),
                      "kwargs": request.kwargs or {}}, default=repr)
    dead_letter.record(client, reason, info.get("routing_key"), raw, request.id)
    raise PoisonMessage(f"the message was {reason}; it is not run again and is kept in {dead_letter.DEAD_LETTER_KEY}")
