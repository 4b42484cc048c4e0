"""`inferq flower`: Flower against the same settings as the workers, with queue depth added to its /metrics.

Flower counts every task event (each message, batched or not) in ``flower_events_total`` and
``flower_task_runtime_seconds``, and knows which workers are online; what it cannot see from events is how
much waits in each queue. That comes from Redis itself, read at each scrape.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.app import make_celery
from producer.contract import SENT_HEADER, queue_keys, queue_name
from producer.redis_clients import DEFAULT_MASTER, redis_client
from producer.settings import KINDS, Settings


class QueueDepthCollector(Collector):
    """``inferq_queue_depth{queue}``: messages waiting; ``inferq_queue_oldest_age_seconds{queue}``: how long the
    oldest of them has waited; ``inferq_unacked_messages``: delivered to a worker and not yet acknowledged
    (running, or prefetched, or held by a worker that died until they are restored).

    The oldest message is the tail of each of its queue's lists (Kombu pushes on the left and takes from the
    right). Its age comes from the send time our producers stamp on it (``contract.SENT_HEADER``); a foreign
    client's message has none, and its age is counted from the first scrape that saw it at the tail, so it
    reads low by up to one scrape interval."""

    def __init__(self, broker_url: str, timeout: float, sentinel_master: str = DEFAULT_MASTER) -> None:
        self._redis = redis_client(broker_url, sentinel_master, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._first_seen: dict[str, float] = {}  # delivery tag of a tail without a send time -> when first seen

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in an inferq queue", labels=["queue"])
        oldest = GaugeMetricFamily("inferq_queue_oldest_age_seconds", "How long the oldest message waiting in an "
                                   "inferq queue has waited (0: none waits)", labels=["queue"])
        unacked = GaugeMetricFamily("inferq_unacked_messages",
                                    "Messages delivered to workers and not yet acknowledged")
        keys = {queue_name(kind): queue_keys(queue_name(kind)) for kind in KINDS}
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for lists in keys.values():
                    for key in lists:
                        pipe.llen(key)
                        pipe.lindex(key, -1)
                pipe.hlen("unacked")
                replies: list[Any] = pipe.execute()
        except redis.RedisError:
            return  # Redis is down: no sample beats a wrong zero; Flower's own metrics still answer
        now, seen = time.time(), dict[str, float]()
        for index, (queue, lists) in enumerate(keys.items()):
            mine = replies[index * 2 * len(lists):(index + 1) * 2 * len(lists)]
            depth.add_metric([queue], sum(mine[0::2]))
            oldest.add_metric([queue], max((self._waited(tail, now, seen) for tail in mine[1::2] if tail),
                                           default=0.0))
        self._first_seen = seen  # only the tails still waiting are remembered
        unacked.add_metric([], replies[-1])
        yield depth
        yield oldest
        yield unacked

    def _waited(self, tail: bytes, now: float, seen: dict[str, float]) -> float:
        try:
            envelope = orjson.loads(tail)
            sent = envelope.get("headers", {}).get(SENT_HEADER)
            if isinstance(sent, int | float):
                return max(0.0, now - sent)
            tag = str(envelope["properties"]["delivery_tag"])
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            tag = hashlib.sha1(tail).hexdigest()  # not a message we can read: still something that waits
        seen[tag] = self._first_seen.get(tag, now)
        return now - seen[tag]


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
