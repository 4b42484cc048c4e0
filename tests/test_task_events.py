"""Task events the fast path buffers survive a lost broker: a batch that could not be published is sent
again once Redis is back, through the dispatcher a restarted consumer makes, as Celery does with its own.

The consumer here is only what the step reads of it (``hub`` and ``event_dispatcher``, the dispatcher a real
one, made as Celery's consumer makes it): a whole worker cannot be made to lose its broker between a batch's
publish and its retry on cue, and the drills that restart Redis under a real worker cover the rest."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from tests.conftest import free_port, start_redis_server, stop
from workers.receiving.events import ThreadSafeTaskEvents, send_task_events


def _dispatcher(app: Celery) -> Any:
    # as Celery's consumer makes it (celery.worker.consumer.events.Events.start) with an event loop
    return app.events.Dispatcher(app.connection_for_write(), hostname="events@test", enabled=True,
                                 buffer_group=["task"])


def _published(pubsub: Any, wanted: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The events of the task.multi messages published on the event exchange, decoded as a receiver would."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < wanted and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is None or message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        assert envelope["content-type"] == "application/json"
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        events.extend(json.loads(body))
    return events


def test_events_held_through_a_lost_broker_are_published_once_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    probe = redis.Redis(port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], probe)
    app = Celery("events-test", broker=f"redis://127.0.0.1:{port}/0")
    app.conf.broker_connection_retry = False
    consumer = SimpleNamespace(hub=None, event_dispatcher=_dispatcher(app))
    step = ThreadSafeTaskEvents(consumer)
    step.start(consumer)
    first = consumer.event_dispatcher
    try:
        send_task_events(first, [("task-succeeded", {"uuid": "sent-before", "runtime": 0.5, "result": "[1.0]"})],
                         all_plain=True)
        stop(server, 10)
        first.flush()  # Redis is gone: the batch is kept where Celery keeps what it could not publish
        assert [event["uuid"] for batch, _ in first._outbound_buffer for event in batch] == ["sent-before"]
        send_task_events(first, [("task-started", {"uuid": "sent-while-down"})], all_plain=True)

        server = start_redis_server(tmp_path, ["--port", str(port)], probe)
        pubsub = probe.pubsub()
        pubsub.psubscribe("*celeryev*")
        assert pubsub.get_message(timeout=5) is not None  # the subscription is confirmed
        # the consumer restarts on a new connection: Celery's Events step, then ours
        second = consumer.event_dispatcher = _dispatcher(app)
        second.extend_buffer(first)
        second.flush()
        step.start(consumer)
        second.flush()
        events = _published(pubsub, 2)
        assert [(event["uuid"], event["type"]) for event in events] == [
            ("sent-before", "task-succeeded"), ("sent-while-down", "task-started")]
        assert all(event["hostname"] == "events@test" for event in events)
        assert events[0]["runtime"] == 0.5 and events[0]["result"] == "[1.0]"
        pubsub.close()
    finally:
        stop(server, 10)
