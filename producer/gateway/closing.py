"""Ending the gateway's open streams on its own terms at shutdown. On SIGTERM uvicorn stops taking
connections and waits ``INFERQ_GATEWAY__SHUTDOWN_GRACE_S`` for those under way; then it cancels their tasks,
which logged each open stream as "Exception in ASGI application" with a traceback, and cut it without a word
to its client. Shortly before that, the streams still open end themselves instead: each sends an error event
saying the gateway is stopping and ``[DONE]``, and its generation is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import uvicorn

T = TypeVar("T")


class Closing:
    """Set once the streams must end; one per app, read by each stream."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def _now(self) -> asyncio.Event:
        if self._event is None:  # made in the serving loop, on first use
            self._event = asyncio.Event()
        return self._event

    def set(self) -> None:
        self._now().set()

    async def next_of(self, pieces: AsyncIterator[T]) -> T:
        """The next of ``pieces``; raises StopAsyncIteration at their end, and ``Stopping`` once closing."""
        closing = self._now()
        if closing.is_set():
            raise Stopping
        piece = asyncio.ensure_future(anext(pieces))
        waiting = asyncio.ensure_future(closing.wait())
        try:
            await asyncio.wait((piece, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not piece.done():
                piece.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await piece
        if piece.cancelled():  # done either way: a piece still under way was cancelled and waited for above
            raise Stopping
        return piece.result()


class Stopping(Exception):
    """The gateway is stopping: the stream ends here."""


def streams_end_before(grace_s: float) -> float:
    """When, after SIGTERM, the open streams end themselves: a second (at most half the grace) before uvicorn
    would cancel them."""
    return grace_s - min(1.0, grace_s / 2)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the app's streams to end before its grace runs out."""

    def __init__(self, config: uvicorn.Config, closing: Closing, grace_s: float) -> None:
        super().__init__(config)
        self._closing, self._grace_s = closing, grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        timer = asyncio.get_running_loop().call_later(streams_end_before(self._grace_s), self._closing.set)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
