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

The fast path's own events (``send_task_events``) wait in a buffer of their own and are encoded with orjson,
a whole flush in one call: Kombu's JSON encoder cost about a tenth of a receiver's CPU draining a backlog.
They go out as Celery's buffered events do, one ``task.multi`` message holding a list, so Flower reads them
the same way. Only events whose values orjson writes exactly as Kombu would go that way (strings, numbers,
None); one holding anything else (a UUID, a datetime, from a foreign client's headers) goes into Celery's
buffer instead.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import orjson
from celery import bootsteps
from celery.utils.time import utcoffset
from kombu.utils import json as kombu_json

FLUSH_INTERVAL = 0.05
BUFFER_LIMIT = 500
_PLAIN = (str, int, float, bool, type(None))  # exact types whose values orjson writes as Kombu's JSON does


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not written by orjson here")


def encode_events(events: list[dict[str, Any]]) -> bytes:
    """A list of events whose values are ``plain``, as Kombu's JSON writes them. orjson refuses (through
    ``_refuse``) the types it does not write natively, and subclasses of str and int, datetimes and dataclasses
    (which it would write differently); Kombu writes what it refuses. UUIDs and enums it would write its own
    way: ``plain`` keeps them out."""
    try:
        return orjson.dumps(events, default=_refuse, option=orjson.OPT_PASSTHROUGH_DATETIME
                            | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS)
    except TypeError:  # also orjson's own refusals: an integer over 64 bits
        encoded: str = kombu_json.dumps(events)  # type: ignore[no-untyped-call]
        return encoded.encode("utf-8")


class _OwnEvents:
    """The fast path's buffered task events, published at each flush of the dispatcher."""

    def __init__(self, dispatcher: Any, lock: threading.RLock) -> None:
        self.dispatcher = dispatcher
        self.lock = lock  # the dispatcher's (``ThreadSafeTaskEvents``): held by whoever touches ``events``
        self.events: list[dict[str, Any]] = []

    def publish(self) -> None:
        """Called with the lock held, after Celery's own flush."""
        dispatcher = self.dispatcher
        if not self.events:
            return
        with dispatcher.mutex:
            producer = dispatcher.producer
            if dispatcher._closed or producer is None:
                return  # kept, as Celery keeps its buffers while closed
            batch = self.events[:]
            exchange = dispatcher.exchange
            try:
                producer.publish(encode_events(batch), routing_key="task.multi", exchange=exchange.name,
                                 declare=[exchange], content_type="application/json", content_encoding="utf-8",
                                 headers=dispatcher.headers, delivery_mode=dispatcher.delivery_mode, retry=False)
            except Exception:
                if not dispatcher.buffer_while_offline:
                    raise  # kept here, as Celery keeps its group's buffer then
                # What Celery does with a batch it could not publish: its next flush sends it again (Kombu's
                # JSON), and a consumer restarted after a lost connection hands it to its new dispatcher.
                dispatcher._outbound_buffer.append((batch, "task.multi"))
            del self.events[:len(batch)]


class ThreadSafeTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._flush_timer: Any = None
        self._own: _OwnEvents | None = None  # the last dispatcher's, for a restarted consumer to take over

    def start(self, consumer: Any) -> None:
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None or getattr(dispatcher, "_inferq_own_events", None) is not None:
            return
        lock = threading.RLock()  # re-entrant: send() calls flush() when the buffer is full
        send, flush = dispatcher.send, dispatcher.flush

        def locked_send(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return send(*args, **kwargs)

        own = _OwnEvents(dispatcher, lock)
        if self._own is not None:  # a restarted consumer: what the closed dispatcher still held goes with this one
            with self._own.lock:
                own.events.extend(self._own.events)
                self._own.events.clear()
        self._own = own

        def locked_flush(errors: bool = True, groups: bool = True) -> Any:
            with lock:
                flushed = flush(errors=errors, groups=groups)
                if groups:
                    own.publish()
                return flushed

        dispatcher.send, dispatcher.flush = locked_send, locked_flush
        dispatcher._inferq_own_events = own  # its lock is the one send and flush take
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


def plain(*values: Any) -> bool:
    """Whether orjson writes every one of these values exactly as Kombu's JSON would (not inf or nan: orjson
    writes null for them)."""
    return all(type(value) in _PLAIN and (type(value) is not float or math.isfinite(value)) for value in values)


def send_task_events(dispatcher: Any, events: list[tuple[str, dict[str, Any]]], all_plain: bool = False) -> None:
    """Many (type, fields) task events into the dispatcher's buffer at once, each exactly as its ``send`` would
    build it (hostname, utcoffset, pid, a clock value and a timestamp of its own), under one taking of the lock:
    the fast path sends two or three events a message, and ``send`` one by one cost it about 12 us each.
    ``all_plain``: every field's value is ``plain``, so orjson may write them."""
    if not events or dispatcher is None or not dispatcher.enabled:
        return
    groups = dispatcher.groups
    own: _OwnEvents | None = getattr(dispatcher, "_inferq_own_events", None)
    if (groups and "task" not in groups) or own is None or "task" not in dispatcher.buffer_group:
        for kind, fields in events:  # not buffered here (no event loop): Celery's own path
            dispatcher.send(kind, **fields)
        return
    hostname, pid, offset, forward = dispatcher.hostname, dispatcher.pid, utcoffset(), dispatcher.clock.forward
    with own.lock:
        celerys = dispatcher._group_buffer["task"]
        buffer = own.events if all_plain else celerys
        for kind, fields in events:
            buffer.append({
                "hostname": hostname, "utcoffset": offset, "pid": pid, "clock": forward(), **fields,
                "timestamp": time.time(), "type": kind})
        if len(own.events) + len(celerys) >= dispatcher.buffer_limit:
            dispatcher.flush()
