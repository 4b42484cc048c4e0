"""What the live workers serve, as the gateway knows it: their ``inferq_status`` replies, asked for in the
background every ``refresh_s`` and remembered per worker for ``remember_s``.

A request whose kind no worker has served within ``remember_s`` is refused with 503 at once, instead of
waiting in a queue nobody reads until its result timeout (minutes). A worker too busy to answer one
broadcast (its consumer's loop is also its message path) is not forgotten: it must stay silent for
``remember_s`` before its kinds count as unserved. ``GET /v1/models`` answers from the same replies, so no
request waits for a broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from producer.errors import InferqError
from producer.settings import Kind

log = logging.getLogger(__name__)


class ServedKinds:
    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], refresh_s: float, remember_s: float) -> None:
        self._fetch = fetch  # the workers' status replies, [{node: status}, ...]; blocking (run in a thread)
        self.refresh_s, self.remember_s = refresh_s, remember_s
        self._seen: dict[str, tuple[float, dict[str, Any]]] = {}  # node -> (when it last answered, its status)
        self._heard = False  # whether one broadcast went out and came back (answered or not)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first replies before the gateway serves, then a refresh every ``refresh_s``."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="inferq-served")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        try:
            replies = await asyncio.to_thread(self._fetch)
        except InferqError as exc:  # Redis away: what was heard stays until it is too old
            log.warning("could not ask the workers what they serve: %s", exc)
            return
        now = time.monotonic()
        for reply in replies:
            for node, status in reply.items():
                self._seen[node] = (now, status)
        self._heard = True

    def statuses(self) -> list[dict[str, Any]]:
        """The status of every worker heard from within ``remember_s``."""
        since = time.monotonic() - self.remember_s
        return [status for seen, status in self._seen.values() if seen >= since]

    def serves(self, kind: Kind) -> bool:
        """Whether a live worker serves ``kind``; True until a broadcast has come back (nothing known yet)."""
        if not self._heard:
            return True
        return any(kind in (status.get("kinds") or ()) for status in self.statuses())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()
