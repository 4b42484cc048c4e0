"""The three Celery tasks: thin glue from a message to the runtime and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from celery import Celery

from producer.contract import message_priority, task_name
from producer.errors import InferqError, PoisonMessage
from producer.settings import KINDS, Kind, Settings
from workers.device.runtime import Result, Runtime, stream_requested
from workers.receiving.deliveries import quarantine_wait, quarantined
from workers.receiving.fastpath import FastPath
from workers.receiving.request import InferqRequest


def register_tasks(app: Celery, runtime: Callable[[], Runtime], settings: Settings,
                   fast: FastPath | None = None) -> None:
    for kind in KINDS:
        _register(app, kind, runtime, settings, fast)


def _register(app: Celery, kind: Kind, runtime: Callable[[], Runtime], settings: Settings,
              fast: FastPath | None) -> None:
    # A redelivery counter outlives the redeliveries it counts: each comes about one visibility timeout apart.
    keep = int(settings.visibility_timeout * (settings.max_deliveries + 2)) + 60
    wait = quarantine_wait(settings.visibility_timeout, getattr(settings.time_limits, kind))

    # *args/**kwargs: a foreign client's unknown or positional arguments must reach validation and come
    # back as InvalidInput, not as a TypeError from Python's call machinery.
    def run(task: Any, /, *args: Any, **kwargs: Any) -> Result:  # `/`: a kwarg named "task" reaches validation
        try:
            with quarantined(app, task.request, settings.max_deliveries, keep, wait) as earlier:
                if earlier is not None:
                    return cast(Result, earlier)
                priority = message_priority((task.request.delivery_info or {}).get("priority"))
                return runtime().handle(kind, args, kwargs, task.request.id, priority)
        except PoisonMessage as exc:  # it never ran here: its stream, if it asked for one, gets its end
            if kind == "generate":
                runtime().settle(task.request.id, stream_requested(kwargs), exc)
            raise

    run.__name__ = run.__qualname__ = kind
    # throws: expected request errors are stored and logged in one line, without a traceback.
    # Strategy: how the consumer hands this task's messages on; the fast path runs ordinary ones itself
    # and gives the rest to Celery's default strategy (the pool, with `run` above).
    options: dict[str, Any] = {"Strategy": staticmethod(fast.strategy(kind))} if fast is not None else {}
    # typing=False: Celery's own argument check would refuse (TypeError) what validation must name (InvalidInput)
    # Request: a result the backend refused to store leaves its message unacknowledged (workers.receiving.request).
    app.task(name=task_name(kind), bind=True, throws=(InferqError,), acks_late=True, typing=False,
             Request=InferqRequest, **options)(run)
