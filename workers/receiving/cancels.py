"""Cancelling generate requests: a caller that gives up (``Client.cancel``) stops its generation's device work.

``Client.cancel(task_id)`` sets ``inferq:cancel:<task id>`` (with the stream TTL) and then publishes the
id on the ``inferq:cancel`` channel, both on the result backend's Redis. Every receiving process listens
on the channel, and checks the key of each generate request as it begins. Because the key is set before
the publish, and a request is registered before its key is checked, a cancel is never missed: either the
check sees the key, or the request was registered when the publish arrived. A publish that arrives while
the listener is away from Redis (a reconnect) is lost, so the keys of every request under way are read
again after each (re)subscription and once a second: such a cancel comes at most a second late. A
request still waiting for the device never runs; a running one leaves its batch before its next step.
Either fails with Cancelled.

Embed and classify requests are not cancelled: they take milliseconds, and their batches run to the end.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable
from threading import Thread

from redis import Redis
from redis.client import PubSub

from producer.contract import CANCEL_CHANNEL, cancel_key

log = logging.getLogger(__name__)
POLL_S = 0.05  # how long the thread waits for a published cancel before it checks the keys of new requests
RECHECK_S = 1.0  # how often the keys of every request under way are read (publishes missed in a reconnect)
RETRY_S = 1.0


class CancelWatch:
    def __init__(self, client: Redis, cancel: Callable[[str], object],
                 under_way: Callable[[], list[str]]) -> None:
        self._client = client
        self._cancel = cancel
        self._under_way = under_way  # the task ids of the generate requests this process runs now
        self._new: queue.SimpleQueue[str] = queue.SimpleQueue()
        # subscribed before the first request can begin, where Redis answers (else the thread keeps trying)
        self._pubsub: PubSub | None = None
        try:
            self._pubsub = self._subscribe()
        except Exception as exc:
            log.warning("cannot listen for cancels yet (%s: %s)", type(exc).__name__, exc)
        Thread(target=self._run, name="inferq-cancels", daemon=True).start()

    def check(self, task_id: str) -> None:
        """A generate request began here: cancel it if its caller already asked (its key is set)."""
        self._new.put(task_id)

    def _subscribe(self) -> PubSub:
        pubsub: PubSub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        pubsub.subscribe(CANCEL_CHANNEL)
        return pubsub

    def _run(self) -> None:
        while True:
            pubsub, self._pubsub = self._pubsub, None
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                rechecked = 0.0  # at once after a (re)subscription
                while True:
                    message = pubsub.get_message(timeout=POLL_S)
                    if message is not None and message.get("type") == "message":
                        self._cancel(_text(message["data"]))
                    self._check_new()
                    if time.monotonic() - rechecked >= RECHECK_S:
                        self._check(self._under_way())
                        rechecked = time.monotonic()
            except Exception as exc:  # Redis away: subscribe again; the keys of new requests are checked then
                log.warning("the cancel listener lost Redis (%s: %s); listening again in %g s", type(exc).__name__,
                            exc, RETRY_S)
                time.sleep(RETRY_S)
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # already gone with its connection
                        pubsub.close()

    def _check_new(self) -> None:
        ids: list[str] = []
        while True:
            try:
                ids.append(self._new.get_nowait())
            except queue.Empty:
                break
        try:
            self._check(ids)
        except Exception:
            for task_id in ids:  # checked again once Redis answers: a cancel must not be missed
                self._new.put(task_id)
            raise

    def _check(self, ids: list[str]) -> None:
        """Cancel those of these requests whose cancel key is set."""
        if not ids:
            return
        found = self._client.mget([cancel_key(task_id) for task_id in ids])
        for task_id, value in zip(ids, found, strict=True):
            if value is not None:
                self._cancel(task_id)


def _text(data: bytes | str) -> str:
    # "replace": anyone may publish on the channel, and bytes that are not UTF-8 (no task's id) must not end
    # the listener's subscription
    return data.decode(errors="replace") if isinstance(data, bytes) else data
