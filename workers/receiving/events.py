"""Task events from task threads, without losing any.

Celery's worker buffers task events and publishes them in groups from its event loop, but the buffer is
a plain list appended to outside any lock: with the threads pool, an event appended while the loop is
flushing is dropped (we saw about one in six lost in a burst). This consumer step puts the buffer's
appends and flushes under one lock, so Flower counts every message.

Celery also flushes that buffer on every turn of its event loop, which under load is one publish (a JSON
encode and a Redis PUBLISH) per one to three events: a fifth of the worker's GIL time in our profile. Here
the buffer is flushed every FLUSH_INTERVAL seconds instead, or when it holds BUFFER_LIMIT events, and once
more when the consumer shuts down: Flower sees events up to 50 ms later, and the worker publishes a few
times per interval however many messages it handles.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import bootsteps
from celery.utils.time import utcoffset

FLUSH_INTERVAL = 0.05
BUFFER_LIMIT = 500


class ThreadSafeTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._flush_timer: Any = None

    def start(self, consumer: Any) -> None:
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None or getattr(dispatcher, "_inferq_lock", None) is not None:
            return
        lock = threading.RLock()  # re-entrant: send() calls flush() when the buffer is full
        send, flush = dispatcher.send, dispatcher.flush

        def locked_send(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return send(*args, **kwargs)

        def locked_flush(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return flush(*args, **kwargs)

        dispatcher.send, dispatcher.flush = locked_send, locked_flush
        dispatcher._inferq_lock = lock
        hub = getattr(consumer, "hub", None)
        if hub is not None:
            dispatcher.on_send_buffered = None  # instead of a flush per event-loop turn ...
            dispatcher.buffer_limit = BUFFER_LIMIT
            # The consumer starts again after each lost connection: one timer, not one more per restart.
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            self._flush_timer = hub.call_repeatedly(FLUSH_INTERVAL, consumer._flush_events)  # ... one per interval

    def shutdown(self, consumer: Any) -> None:
        # Runs before Celery's Events step closes the dispatcher, which would drop what is still buffered.
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()


def send_task_events(dispatcher: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Many (type, fields) task events into the dispatcher's buffer at once, each exactly as its ``send`` would
    build it (hostname, utcoffset, pid, a clock value and a timestamp of its own), under one taking of the lock:
    the fast path sends two or three events a message, and ``send`` one by one cost it about 12 us each."""
    if not events or dispatcher is None or not dispatcher.enabled:
        return
    groups = dispatcher.groups
    lock = getattr(dispatcher, "_inferq_lock", None)
    if (groups and "task" not in groups) or lock is None or "task" not in dispatcher.buffer_group:
        for kind, fields in events:  # not buffered here (no event loop): Celery's own path
            dispatcher.send(kind, **fields)
        return
    hostname, pid, offset, forward = dispatcher.hostname, dispatcher.pid, utcoffset(), dispatcher.clock.forward
    with lock:
        buffer = dispatcher._group_buffer["task"]
        for kind, fields in events:
            buffer.append({"hostname": hostname, "utcoffset": offset, "pid": pid, "clock": forward(), **fields,
                           "timestamp": time.time(), "type": kind})
        if len(buffer) >= dispatcher.buffer_limit:
            dispatcher.flush()
