"""Admission control: a request whose kind's queue (of its lane) is deeper than a limit, or a streamed one past
the gateway's limit of open streams, is refused (429) before anything is sent, so an overloaded deployment
answers at once instead of timing out later, and a client (the OpenAI SDK does so by itself) retries after
``Retry-After`` seconds.

A request is measured against its own lane's list: an interactive one against the interactive list (bulk work
waits behind it in its own list, so a bulk backlog makes no interactive request wait and refuses none), and
a ``service_tier: "flex"`` one, sent on the bulk lane, against the bulk list, which nothing else bounds. The
depth is one LLEN on the broker, read at most once per ``cache_s`` per kind and lane and shared by every request
of them meanwhile: under load the check costs a dictionary lookup, and the limit is overshot by at most what
arrives in ``cache_s``.

Open streams are counted in the gateway process (``StreamSlots``): each holds a Redis connection to the result
backend for as long as it is open, and a gateway that opened them without bound would take Redis's last
connections (``maxclients``) from the workers themselves.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import redis

from producer.contract import LANE_PRIORITY, PRIORITY_STEPS, Lane, queue_keys, queue_name
from producer.errors import InferqConnectionError
from producer.redis_clients import DEFAULT_MASTER, async_redis_client
from producer.settings import Kind, redact


class QueueFull(Exception):
    def __init__(self, kind: Kind, depth: int, limit: int, retry_after: int, lane: Lane = "interactive") -> None:
        queue = kind if lane == "interactive" else f"{kind} {lane}"
        super().__init__(f"the {queue} queue holds {depth} messages waiting, over this gateway's limit of {limit}; "
                         f"retry after {retry_after} s")
        self.kind, self.retry_after = kind, retry_after


class Admission:
    def __init__(self, broker_url: str, limit: int | None, cache_s: float, retry_after: int,
                 connect_timeout: float, sentinel_master: str = DEFAULT_MASTER) -> None:
        self.limit, self.cache_s, self.retry_after = limit, cache_s, retry_after
        self._url = broker_url
        self._redis = async_redis_client(broker_url, sentinel_master, socket_connect_timeout=connect_timeout,
                                         socket_timeout=connect_timeout) if limit is not None else None
        self._read: dict[tuple[Kind, Lane], tuple[float, int]] = {}  # (kind, lane) -> (when read, depth)

    async def admit(self, kind: Kind, lane: Lane = "interactive") -> None:
        """Returns when the request may be sent on ``lane``; raises QueueFull, or InferqConnectionError
        without Redis."""
        if self._redis is None or self.limit is None:
            return
        now = time.monotonic()
        read = self._read.get((kind, lane))
        if read is None or now - read[0] >= self.cache_s:
            key = queue_keys(queue_name(kind))[PRIORITY_STEPS.index(LANE_PRIORITY[lane])]  # the lane's list
            try:
                depth = int(await self._redis.llen(key))
            except (redis.RedisError, OSError) as exc:
                raise InferqConnectionError(f"could not read the {kind} queue's depth at {redact(self._url)}: "
                                            f"{exc}") from None
            read = self._read[(kind, lane)] = (now, depth)
        if read[1] > self.limit:
            raise QueueFull(kind, read[1], self.limit, self.retry_after, lane)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class StreamsFull(Exception):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"this gateway holds {limit} streams open, its limit (INFERQ_GATEWAY__MAX_STREAMS); "
                         f"retry after {retry_after} s, or ask without streaming")
        self.retry_after = retry_after


class StreamSlots:
    """How many streams are open in this gateway process, and a refusal past ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None, retry_after: int) -> None:
        self.limit, self.retry_after = limit, retry_after
        self.open = 0

    def take(self) -> Callable[[], None]:
        """One slot, or StreamsFull; returns its release, which may be called any number of times."""
        if self.limit is not None and self.open >= self.limit:
            raise StreamsFull(self.limit, self.retry_after)
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1

        return release

    @staticmethod
    def tie(owner: object, release: Callable[[], None]) -> None:
        """Release the slot when ``owner`` is collected, should no path release it before: a response whose
        client left before its body was iterated never runs the body's own cleanup."""
        weakref.finalize(owner, release)
