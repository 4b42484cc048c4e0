"""Task events from task threads, without losing any.

Celery's worker buffers task events and flushes them from its event loop, but the buffer is a plain list
appended to outside the dispatcher's lock: with the threads pool, an event appended while the loop is
flushing is dropped (we saw about one in six lost in a burst). This consumer step turns the buffering off,
so every event is published at once, under the dispatcher's lock. Flower then counts every message.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps


class UnbufferedTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.events:Events",)

    def start(self, consumer: Any) -> None:
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()  # anything buffered before this step ran
            dispatcher.buffer_group = frozenset()
