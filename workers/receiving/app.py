"""The worker's Celery app: the shared configuration, the tasks, and models loaded at worker start."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown
from kombu.transport import TRANSPORT_ALIASES

from producer.app import backend_transport_options, make_celery
from producer.redis_clients import is_sentinel
from producer.settings import Kind, Settings
from workers.device.runtime import Runtime
from workers.errors import WorkerError
from workers.receiving import backend, control, serialization, trace_logs
from workers.receiving.cancels import CancelWatch
from workers.receiving.events import ThreadSafeTaskEvents
from workers.receiving.fastpath import DrainFastPath, FastPath
from workers.receiving.streams import StreamPublisher
from workers.receiving.tasks import register_tasks

log = logging.getLogger(__name__)


class WorkerApp:
    """A Celery app whose tasks run on one Runtime, loaded when its worker starts."""

    def __init__(self, settings: Settings, kinds: tuple[Kind, ...]) -> None:
        self.settings = settings
        self.kinds = kinds
        self.celery: Celery = make_celery(settings, "inferq-worker", worker=True)
        self.celery.loader.override_backends = backend.OVERRIDES
        serialization.install()  # messages decoded with orjson
        trace_logs.install()  # what inferq reports itself, Celery's tracer does not log again with a traceback
        # counts, logs and answers messages that cannot be run (undecodable, pickled, malformed)
        self.celery.conf.worker_consumer = "workers.receiving.consumer:InferqConsumer"
        # ... and list entries that are not even messages (a stray LPUSH must not stop the worker)
        transport = "SentinelTransport" if is_sentinel(settings.broker) else "Transport"
        self.celery.conf.broker_transport = f"workers.receiving.transport:{transport}"
        # A worker waits out any broker outage: with the short reconnect steps (consumer.RECONNECT_INTERVALS),
        # Celery's 100 tries would give up after about 3 minutes, and a worker that gives up exits
        self.celery.conf.broker_connection_max_retries = None
        if is_sentinel(settings.broker):
            # Kombu treats the sentinels of the URL as failover alternates, and when it moves on to the next one
            # it takes the transport from that URL's scheme: the scheme must name ours too, or a reconnection
            # during a failover leaves the worker on Kombu's plain Sentinel transport (no ack_many, no takes).
            TRANSPORT_ALIASES["sentinel"] = self.celery.conf.broker_transport
        # A worker whose result store fails gives the result up, and then acknowledges the message: the job
        # is lost. Producers retry briefly (they must not hang); a worker keeps retrying through a Redis
        # restart, for up to the visibility timeout, after which the message would be handed out again anyway.
        self.celery.conf.result_backend_transport_options = backend_transport_options(settings, {
            "max_retries": max(3, int(settings.visibility_timeout)), "interval_start": 0, "interval_step": 0.5,
            "interval_max": 1.0})
        self._runtime: Runtime | None = None
        self.fast_path = FastPath(self.celery, self.runtime) if settings.fast_path else None
        register_tasks(self.celery, self.runtime, settings, self.fast_path)
        self.celery.steps["consumer"].add(ThreadSafeTaskEvents)
        if self.fast_path is not None:
            self.celery.inferq_fast_path = self.fast_path  # for the step that drains it at shutdown
            self.celery.steps["consumer"].add(DrainFastPath)
        worker_init.connect(self._on_worker_init, weak=False)
        worker_shutdown.connect(self._on_worker_shutdown, weak=False)

    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise WorkerError("the models are not loaded: this task ran outside a started inferq worker")
        return self._runtime

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.celery:
            return
        pool = str(getattr(sender, "pool_cls", ""))
        if "prefork" in pool:
            # Forking after CUDA (or even torch's thread pools) is initialised breaks the children.
            raise WorkerError("inferq workers load their models once and never fork: use -P threads or -P solo")
        runtime = Runtime(self.settings, self.kinds)
        if "generate" in self.kinds:
            settings, client = self.settings, self.celery.backend.client  # type: ignore[union-attr]
            # one text entry per token at most, plus a restart and the end, for each delivery of the message
            bound = (settings.limits.max_new_tokens + 2) * settings.max_deliveries
            runtime.streams = StreamPublisher(client, settings.stream_ttl, bound)
            runtime.cancels = CancelWatch(client, runtime.cancel, runtime.generating)
        runtime.load()
        self._runtime = runtime
        control.publish(runtime)

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self._runtime is not None and getattr(sender, "app", None) is self.celery:
            self._runtime.close()
