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
from typing import Any

from celery import bootsteps

FLUSH_INTERVAL = 0.05
BUFFER_LIMIT = 500


class ThreadSafeTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._flush_timer: Any = None

    def start(self, consumer: Any) -> None:
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None or getattr(dispatcher, "_inferq_locked", False):
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
        dispatcher._inferq_locked = True
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
