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

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

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


def sentinel_kwargs(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    # the sentinels get the timeouts only: the master's password and database mean nothing to them
    return {key: value for key, value in connection_kwargs.items() if key.startswith("socket_")}


def redis_client(url: str, master: str, **kwargs: Any) -> redis.Redis:
    """A client of the Redis at ``url``; for a Sentinel URL, of the current master of ``master``, found again
    through the sentinels whenever a connection is made (after a failover, say)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    group = SentinelGroup.from_url(url)
    sentinel = redis.sentinel.Sentinel(group.sentinels, sentinel_kwargs=sentinel_kwargs(kwargs), **kwargs)
    client: redis.Redis = sentinel.master_for(master, **group.master_kwargs())
    return client


def async_redis_client(url: str, master: str, **kwargs: Any) -> redis.asyncio.Redis:
    """:func:`redis_client` for asyncio."""
    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)
    group = SentinelGroup.from_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(group.sentinels, sentinel_kwargs=sentinel_kwargs(kwargs), **kwargs)
    client: redis.asyncio.Redis = sentinel.master_for(master, **group.master_kwargs())
    return client
