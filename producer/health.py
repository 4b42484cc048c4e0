"""`inferq check`: is a worker up, are its models loaded, does its device answer a tiny inference?

One broadcast of the ``inferq_check`` remote-control command: a worker that replies is alive (that is the
ping), and its reply says whether one tiny request through each of its models succeeded on its device.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from producer.client import Client
from producer.connection import ConnectionErrors, broadcast
from producer.redis_clients import redis_client
from producer.settings import redact


@dataclass(frozen=True)
class WorkerHealth:
    node: str
    ok: bool
    detail: str


def check_workers(client: Client, nodes: Sequence[str] = (), local: bool = False,
                  timeout: float = 10.0) -> list[WorkerHealth]:
    """Every worker that answered (only `nodes` when given; only this host's with `local`).

    Returns as soon as every one of `nodes` answered; otherwise once no answer came for `timeout` seconds
    (without names it cannot know who else will answer, and a failing worker must not be missed)."""
    with ConnectionErrors(f"the broker at {redact(client.settings.broker)}"):
        # One plain round trip first, within the timeout: the broadcast's publish retries a broker that refuses
        # for seconds (--timeout 2 against a closed port took 6.4 s).
        wait = min(timeout, client.settings.connect_timeout)
        try:
            with redis_client(client.settings.broker, client.settings.sentinel_master, socket_connect_timeout=wait,
                              socket_timeout=wait) as probe:
                probe.ping()
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except (redis.RedisError, ValueError):
            pass  # a URL redis-py reads otherwise than Kombu (TLS options), or no PING right: the broadcast tells
        # named: only they answer, so the collection ends with their last answer
        replies = broadcast(client.app, "inferq_check", reply=True, timeout=timeout,
                            destination=list(nodes) or None, limit=len(set(nodes)) or None)
    host = socket.gethostname()
    found: list[WorkerHealth] = []
    for reply in replies:
        for node, answer in reply.items():
            if local and node.rpartition("@")[2] != host:
                continue
            if answer.get("ok"):
                detail = f"{', '.join(answer.get('models', []))} answered in {answer.get('seconds', 0) * 1000:.0f} ms"
                found.append(WorkerHealth(node, True, detail))
            else:
                found.append(WorkerHealth(node, False, str(answer.get("error", answer))))
    return sorted(found, key=lambda health: health.node)


def verdict(found: Sequence[WorkerHealth], nodes: Sequence[str], expect: int) -> str | None:
    """None when healthy; else why not."""
    failing = [health for health in found if not health.ok]
    if failing:
        return "; ".join(f"{health.node}: {health.detail}" for health in failing)
    missing = sorted(set(nodes) - {health.node for health in found})
    if missing:
        return f"no answer from {', '.join(missing)}"
    if len(found) < expect:
        return f"{len(found)} healthy worker(s) answered; expected at least {expect}"
    return None
