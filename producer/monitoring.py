"""`inferq flower`: Flower against the same settings as the workers, with queue depth added to its /metrics.

Flower counts every task event (each message, batched or not) in ``flower_events_total`` and
``flower_task_runtime_seconds``, and knows which workers are online; what it cannot see from events is how
much waits in each queue. That comes from Redis itself, read at each scrape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.app import make_celery
from producer.contract import PRIORITY_STEPS, queue_keys, queue_name
from producer.redis_clients import DEFAULT_MASTER, redis_client
from producer.settings import KINDS, Settings


class QueueDepthCollector(Collector):
    """``inferq_queue_depth{queue}``: messages waiting; ``inferq_unacked_messages``: delivered to a worker and
    not yet acknowledged (running, or prefetched, or held by a worker that died until they are restored)."""

    def __init__(self, broker_url: str, timeout: float, sentinel_master: str = DEFAULT_MASTER) -> None:
        self._redis = redis_client(broker_url, sentinel_master, socket_connect_timeout=timeout, socket_timeout=timeout)

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in an inferq queue", labels=["queue"])
        unacked = GaugeMetricFamily("inferq_unacked_messages",
                                    "Messages delivered to workers and not yet acknowledged")
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for kind in KINDS:
                    for key in queue_keys(queue_name(kind)):
                        pipe.llen(key)
                pipe.hlen("unacked")
                counts: list[int] = pipe.execute()
        except redis.RedisError:
            return  # Redis is down: no sample beats a wrong zero; Flower's own metrics still answer
        per_queue = len(PRIORITY_STEPS)
        for index, kind in enumerate(KINDS):
            depth.add_metric([queue_name(kind)], sum(counts[index * per_queue:(index + 1) * per_queue]))
        unacked.add_metric([], counts[-1])
        yield depth
        yield unacked


def flower_argv(settings: Settings, port: int | None, address: str | None) -> list[str]:
    argv = ["flower", f"--port={port or settings.flower_port}", f"--address={address or settings.flower_address}"]
    if settings.flower_db:
        # workers, tasks and counters survive a Flower restart
        argv += ["--persistent=True", f"--db={settings.flower_db}", "--state_save_interval=60000"]
    return argv


def run_flower(settings: Settings, port: int | None = None, address: str | None = None) -> Any:
    """Run Flower in this process until it is stopped."""
    if settings.flower_basic_auth is not None:
        # Through the environment, never argv: a password on the command line is visible to every user in `ps`.
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    REGISTRY.register(QueueDepthCollector(settings.broker, settings.connect_timeout, settings.sentinel_master))
    app = make_celery(settings, "inferq-flower")
    # Flower's task-result API builds AsyncResult(task_id) without an app, so it gets the default app; unless
    # ours is that default, the default has no result backend and the API answers 503 to every request.
    app.set_default()
    app.set_current()
    return app.start(flower_argv(settings, port, address))
