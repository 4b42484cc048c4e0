"""The Celery app both sides build from one :class:`Settings`: JSON only, one queue per kind."""

from __future__ import annotations

import contextlib
import functools
import uuid
from typing import Any

import redis.utils
from celery import Celery
from celery.result import AsyncResult
from kombu import Exchange, Queue  # type: ignore[attr-defined]
from kombu.transport import TRANSPORT_ALIASES

from producer import result_backend
from producer.contract import queue_name, sent_now, task_name
from producer.redis_clients import is_sentinel
from producer.settings import KINDS, Kind, Settings

# redis-py looks its own version up in the installed package's metadata for every new connection and every
# result backend (Celery makes one per thread): 0.9 ms of parsing each time, 10% of a worker's GIL time in
# the first seconds of a burst while its task threads start. The answer cannot change while we run.
redis.utils.get_lib_version = functools.cache(redis.utils.get_lib_version)


def make_celery(settings: Settings, main: str = "inferq", worker: bool = False) -> Celery:
    app = Celery(main, broker=settings.broker, backend=settings.backend, set_as_current=False)
    app.loader.override_backends = dict(result_backend.OVERRIDES)
    timeout = settings.connect_timeout
    # How long one Redis command may go unanswered. A worker's commands include blocking ones, and a worker
    # rides out a slow Redis (30 s, tried once more). A producer has a caller waiting: a Redis that accepts
    # connections and stops answering made a get(timeout=0.5) take 60 s, and a send 30 s; its commands
    # answer at once but for a send's WAIT for replicas, so it gives up after the connect timeout (plus that
    # WAIT's own).
    wait_s = settings.broker_wait_timeout_ms / 1000 if settings.broker_wait_replicas else 0.0
    broker_socket_timeout = max(timeout, 30.0) if worker else timeout + wait_s
    backend_socket_timeout = max(timeout, 30.0) if worker else timeout
    app.conf.update(
        # The public contract: JSON in, JSON out; nothing else is decoded (no pickle, ever).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Each queue has a direct exchange of its own name: exactly what a plain Celery client declares
        # for send_task(..., queue="embed"), so foreign clients and our workers agree on the routing.
        task_queues=[Queue(queue_name(kind), Exchange(queue_name(kind), type="direct"), routing_key=queue_name(kind))
                     for kind in KINDS],
        task_routes={task_name(kind): {"queue": queue_name(kind)} for kind in KINDS},
        task_default_queue=queue_name("embed"),
        result_expires=settings.result_expires,
        # A task is acknowledged after it ran, and goes back to the queue if its worker dies mid-task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        # Bounded waits: a producer or worker facing a dead Redis raises instead of hanging.
        broker_connection_timeout=timeout,
        broker_connection_retry_on_startup=True,
        # Messages a dead worker held come back after visibility_timeout; Kombu's sweep for them runs every
        # interval x throttle seconds (10 x 10 by default: 100 s more), here every 5 s. A worker that dies
        # during a sweep leaves the sweep's lock behind until it expires: 30 s here, not Kombu's 300.
        broker_transport_options={"socket_connect_timeout": timeout, "socket_timeout": broker_socket_timeout,
                                  "visibility_timeout": settings.visibility_timeout,
                                  "unacked_restore_interval": 5, "unacked_restore_throttle": 1,
                                  "unacked_mutex_expire": 30, **sentinel_options(settings.broker, settings),
                                  "wait_replicas": settings.broker_wait_replicas,
                                  "wait_timeout_ms": settings.broker_wait_timeout_ms},
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_sent_events,
        redis_socket_connect_timeout=timeout,
        redis_socket_timeout=backend_socket_timeout,
        redis_retry_on_timeout=worker,
        # The result backend reconnects a few times, not Celery's default 20 x 1 s, before giving up.
        result_backend_transport_options=backend_transport_options(settings, {
            "max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0}),
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0},
        **producer_transport(settings),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def sentinel_options(url: str, settings: Settings) -> dict[str, Any]:
    """What Kombu's and Celery's Sentinel support need beside a sentinel:// URL: the master's name, and
    timeouts for the sentinels themselves (without them a dead sentinel stalls the search for the master)."""
    if not is_sentinel(url):
        return {}
    timeout = settings.connect_timeout
    return {"master_name": settings.sentinel_master,
            "sentinel_kwargs": {"socket_connect_timeout": timeout, "socket_timeout": timeout}}


def producer_transport(settings: Settings) -> dict[str, Any]:
    """Producers publish through producer/transport.py where a sentinel:// URL or broker_wait_replicas asks for
    more than Kombu's own transports do; otherwise through Kombu's."""
    sentinel = is_sentinel(settings.broker)
    if not settings.broker_wait_replicas and not sentinel:
        return {}
    transport = f"producer.transport:{'SentinelTransport' if sentinel else 'Transport'}"
    if sentinel:
        # Kombu takes the transport from the URL's scheme again when it moves to the next sentinel
        TRANSPORT_ALIASES["sentinel"] = transport
    return {"broker_transport": transport}


def backend_transport_options(settings: Settings, retry_policy: dict[str, Any]) -> dict[str, Any]:
    return {"retry_policy": retry_policy, **sentinel_options(settings.backend, settings)}


def publish(app: Celery, kind: Kind, kwargs: dict[str, Any], priority: int = 0,
            task_id: str | None = None) -> AsyncResult:
    """Send one task message to its kind's queue. Celery subscribes to the result's channel before it
    publishes: a send that fails takes that subscription back, or each failed call (a broker away while the
    result Redis answers) left one behind for the life of the process."""
    task_id = task_id or str(uuid.uuid4())
    try:
        return app.send_task(task_name(kind), kwargs=kwargs, queue=queue_name(kind), task_id=task_id,
                             priority=priority or None,  # none: what any Celery client sends
                             headers=sent_now())
    except BaseException:
        with contextlib.suppress(Exception):
            app.backend.result_consumer.cancel_for(task_id)
        raise
