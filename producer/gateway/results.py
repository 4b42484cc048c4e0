"""Waiting for task results in the gateway's event loop: told by pub/sub, never polling.

The worker publishes each result on the channel named like its key as it stores it (Celery's own result
consumer relies on that). One subscribing connection per gateway process serves every request waiting: a
request subscribes to its task's channel, reads the key once (the answer may have landed before the
subscription took effect), and waits for its message. ``Handle.wait`` polled instead, 5 ms doubling to
100 ms: up to that much latency added to every answer, and a GET per waiting request per step.

Once a second the results of requests waiting longer than that are read from their keys, so an answer
published while the subscribing connection was reconnecting is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis

from producer.errors import InferqConnectionError, ResultTimeout
from producer.redis_clients import DEFAULT_MASTER, async_redis_client
from producer.results import final_meta, outcome
from producer.settings import redact

log = logging.getLogger(__name__)
SWEEP_S = 1.0  # how often the keys of requests still waiting are read
READ_TIMEOUT_S = 1.0  # the reader's longest wait for a message, so it sweeps on time
RECONNECT_S = 0.5  # between attempts to reach Redis again


class ResultWaiter:
    def __init__(self, backend: Any, url: str, connect_timeout: float, sentinel_master: str = DEFAULT_MASTER) -> None:
        self._backend = backend  # Celery's result backend: its key names and its reading of errors
        self._url = url
        self._redis = async_redis_client(url, sentinel_master, socket_connect_timeout=connect_timeout,
                                         socket_timeout=connect_timeout)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[str, tuple[float, list[asyncio.Future[dict[str, Any]]]]] = {}  # key -> since, futures
        self._reader: asyncio.Task[None] | None = None

    async def wait(self, task_id: str, timeout: float) -> Any:
        """The task's result, or its error raised as the task's own type; ResultTimeout after ``timeout``."""
        key = self._backend.get_key_for_task(task_id).decode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = self._waiting.setdefault(key, (time.monotonic(), []))
        entry[1].append(future)
        try:
            try:
                if len(entry[1]) == 1:
                    await self._pubsub.subscribe(key)
                self._start_reader()
                stored = await self._redis.get(key)
            except (redis.RedisError, OSError) as exc:
                raise InferqConnectionError(f"the result backend at {redact(self._url)}: {exc}") from None
            if isinstance(stored, bytes):
                self._resolve(key, stored)
            try:
                meta = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise ResultTimeout(f"task {task_id} gave no result within {timeout:g} s; it may still run") from None
        finally:
            await self._forget(key, future)
        return outcome(self._backend, meta)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await self._redis.aclose()

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever(), name="inferq-results")

    async def _forget(self, key: str, future: asyncio.Future[dict[str, Any]]) -> None:
        entry = self._waiting.get(key)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            entry[1].remove(future)
        if not entry[1]:
            del self._waiting[key]
            with contextlib.suppress(redis.RedisError, OSError):  # gone with its connection, if that went
                await self._pubsub.unsubscribe(key)

    def _resolve(self, key: str, value: bytes) -> None:
        meta = final_meta(self._backend, value)
        entry = self._waiting.get(key)
        if meta is None or entry is None:
            return
        for future in entry[1]:
            if not future.done():
                future.set_result(meta)

    async def _read_forever(self) -> None:
        last_sweep = time.monotonic()
        while self._waiting or self._pubsub.subscribed:
            try:
                message = await self._pubsub.get_message(timeout=READ_TIMEOUT_S)
                if message is not None and message["type"] == "message":
                    channel = message["channel"]
                    self._resolve(channel.decode() if isinstance(channel, bytes) else channel, message["data"])
                if time.monotonic() - last_sweep >= SWEEP_S:
                    last_sweep = time.monotonic()
                    await self._sweep(last_sweep - SWEEP_S)
            except (redis.RedisError, OSError) as exc:  # redis-py subscribes again as it reconnects
                log.warning("result notifications interrupted (%s); reading stored results meanwhile", exc)
                await asyncio.sleep(RECONNECT_S)
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._sweep(time.monotonic())
            except RuntimeError:  # nothing subscribed any more (the last request just left)
                await asyncio.sleep(0)
                if not self._waiting:
                    return

    async def _sweep(self, before: float) -> None:
        """Read the keys of requests waiting since before ``before``: answers a lost message would strand."""
        keys = [key for key, (since, _) in self._waiting.items() if since <= before]
        if keys:
            for key, value in zip(keys, await self._redis.mget(keys), strict=True):
                if isinstance(value, bytes):
                    self._resolve(key, value)
