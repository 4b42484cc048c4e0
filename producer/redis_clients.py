"""Opening a Redis client for any URL inferq accepts: a plain or TLS Redis, or the master of a Sentinel group.

Celery and Kombu open their own connections (their ``sentinel`` transport and result backend, given the master
name in their transport options); every client inferq opens beside them (queue depth for Flower, `inferq check`,
the gateway's result waiter and admission control, stream readers) comes from here, so a Sentinel URL reaches
the current master everywhere rather than sending data commands to a sentinel.

A Sentinel URL lists the sentinels, separated by ``;``, as Kombu and Celery read it:
``sentinel://[:password@]host:port[/db];sentinel://host:port;...``. The password and database are those of
the master (taken from the first entry that has them); the sentinels themselves are asked without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.utils import str_if_bytes

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
DEFAULT_MASTER = "mymaster"  # what Redis's sentinel.conf example names its master


def is_sentinel(url: str) -> bool:
    return url.partition("://")[0] == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelGroup:
    """What a Sentinel URL names: the sentinels to ask, and the master's database and credentials."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> SentinelGroup:
        sentinels: list[tuple[str, int]] = []
        db, username, password = 0, None, None
        for chunk in filter(None, (part.strip() for part in url.split(";"))):
            parts = urlsplit(chunk)
            if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
                raise ValueError(f"{chunk.split('@')[-1]!r} is not a sentinel://host:port entry")
            sentinels.append((parts.hostname, parts.port or SENTINEL_PORT))
            if parts.path.strip("/") and not db:
                db = int(parts.path.strip("/"))
            if parts.password and password is None:
                username, password = unquote(parts.username or "") or None, unquote(parts.password)
        if not sentinels:
            raise ValueError("a Sentinel URL names no sentinel")
        return cls(sentinels, db, username, password)

    def master_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password}


def _named_master(state: Any, reply: Any, healthy: bool) -> tuple[str, int] | None:
    """The master one sentinel names: the address GET-MASTER-ADDR-BY-NAME gives, when that is a replica it has
    promoted, or when the master it describes (SENTINEL MASTER) is up."""
    if not reply:
        return None
    address = (str_if_bytes(reply[0]), int(reply[1]))
    promoted = address != (str_if_bytes(state.get("ip", "")), int(state.get("port", 0)))
    return address if promoted or healthy else None


class Sentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel, finding the master as the sentinels name it to clients.

    redis-py reads the master's entry of SENTINEL MASTERS, which keeps the old master's address until the
    failover has reconfigured every replica and the old master itself. When the old master is alive (a manual
    failover, a partition) that is about 10 s after the promotion, and every connection made meanwhile went to
    the old master, whose writes are dropped when it becomes a replica (tests/test_sentinel_drill.py lost
    hundreds of accepted requests so). GET-MASTER-ADDR-BY-NAME names the promoted replica at once."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for index, sentinel in enumerate(self.sentinels):
            try:
                state: Any = sentinel.sentinel_master(service_name)
                reply: Any = sentinel.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", service_name)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError) as exc:
                errors.append(f"{sentinel}: {exc!r}")
                continue
            healthy = self.check_master_state(state, service_name)  # type: ignore[no-untyped-call]
            address = _named_master(state, reply, healthy)
            if address is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]  # ask it first next time
                return address
        raise redis.sentinel.MasterNotFoundError(f"No master found for {service_name!r}: {', '.join(errors)}")


class AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    """:class:`Sentinel` for asyncio."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for index, sentinel in enumerate(self.sentinels):
            try:
                state: Any = await sentinel.sentinel_master(service_name)
                reply: Any = await sentinel.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", service_name)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError) as exc:
                errors.append(f"{sentinel}: {exc!r}")
                continue
            healthy = self.check_master_state(state, service_name)
            address = _named_master(state, reply, healthy)
            if address is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return address
        raise redis.sentinel.MasterNotFoundError(f"No master found for {service_name!r}: {', '.join(errors)}")


def sentinel_kwargs(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    # the sentinels get the timeouts only: the master's password and database mean nothing to them
    return {key: value for key, value in connection_kwargs.items() if key.startswith("socket_")}


def redis_client(url: str, master: str, **kwargs: Any) -> redis.Redis:
    """A client of the Redis at ``url``; for a Sentinel URL, of the current master of ``master``, found again
    through the sentinels whenever a connection is made (after a failover, say)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    group = SentinelGroup.from_url(url)
    sentinel = Sentinel(group.sentinels, sentinel_kwargs=sentinel_kwargs(kwargs), **kwargs)
    client: redis.Redis = sentinel.master_for(master, **group.master_kwargs())
    return client


def async_redis_client(url: str, master: str, **kwargs: Any) -> redis.asyncio.Redis:
    """:func:`redis_client` for asyncio."""
    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)
    group = SentinelGroup.from_url(url)
    sentinel = AsyncSentinel(group.sentinels, sentinel_kwargs=sentinel_kwargs(kwargs), **kwargs)
    client: redis.asyncio.Redis = sentinel.master_for(master, **group.master_kwargs())
    return client


class MasterWatch:
    """Whether a Sentinel-managed pool still talks to the master, asked of the sentinels at most every
    ``every_s`` seconds.

    redis-py asks the sentinels only when it makes a connection, and a master that Sentinel replaced while it
    lived (a manual failover, a partition) keeps its clients' connections open and their writes accepted until
    Sentinel turns it into a replica, about 8 s later, when it drops them (tests/test_sentinel_drill.py). Each
    client that holds connections asks now and then instead: when the master moved, redis-py closes the pool's
    idle connections, and the caller drops any it holds."""

    BACK_OFF_S = 30.0  # after no sentinel answered: each try can block for the sentinels' timeouts

    def __init__(self, every_s: float = 0.5) -> None:
        self._every_s = every_s
        self._next = 0.0

    def moved(self, pool: Any, connection: Any = None) -> bool:
        """True when ``pool`` (a Sentinel one; any other never moves) no longer reaches the master, or
        ``connection`` is not the master's."""
        if not hasattr(pool, "get_master_address") or time.monotonic() < self._next:
            return False
        before = pool.master_address
        try:
            now = pool.get_master_address()  # closes the idle connections to an old master
        except (redis.ConnectionError, redis.TimeoutError):  # no sentinel answers: the connections may be fine
            self._next = time.monotonic() + self.BACK_OFF_S
            return False
        self._next = time.monotonic() + self._every_s
        return bool(now != before or (connection is not None and not pool.owns_connection(connection)))
