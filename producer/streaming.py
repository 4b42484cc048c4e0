"""Reading a streamed generation: the text of a ``stream: true`` generate task, piece by piece, as it is decoded.

The worker writes the task's Redis Stream (``contract.stream_key``; entries described in
workers/receiving/streams.py and the README); this reads it with blocking XREADs on the result backend's
Redis. The pieces, joined, are the result's text. A task that ended without writing its stream's last
entry (a message refused before it reached a worker's generate path) is caught by its stored result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from redis import Redis

from producer.connection import ConnectionErrors
from producer.contract import CANCEL_CHANNEL, GenerateResult, cancel_key, stream_key
from producer.errors import TASK_ERRORS, InferqError, ResultTimeout, StreamRestarted
from producer.redis_clients import DEFAULT_MASTER, async_redis_client, redis_client
from producer.settings import redact

BLOCK_S = 1.0  # one XREAD waits at most this long; between them the stored result is checked
COUNT = 512


class GenerationStream:
    """A streamed generate task: iterate over it (``for``, or ``async for`` in an event loop) for its text
    as it comes. After the iteration, ``finish_reason``, ``prompt_tokens`` and ``completion_tokens`` are set
    as in its result."""

    def __init__(self, handle: Any, timeout: float, backend_url: str, cancel: Callable[[str], None],
                 connect_timeout: float = 5.0, sentinel_master: str = DEFAULT_MASTER) -> None:
        self._handle = handle
        self._cancel = cancel
        self._timeout = timeout
        self._backend_url = backend_url
        self._sentinel_master = sentinel_master
        self._connect_timeout = connect_timeout
        self._last: Any = b"0-0"  # the id of the last entry read
        self.text = ""  # what has been read so far
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    @property
    def id(self) -> str:
        return str(self._handle.id)

    def cancel(self) -> None:
        """Ask the workers to stop this generation (``Client.cancel``); the stream then ends with Cancelled."""
        self._cancel(self.id)

    def result(self, timeout: float | None = None) -> GenerateResult:
        """The stored result, within ``timeout`` (the stream's text is then the result's; what is left of the
        stream unread is not read: the result holds it all, and a restarted stream's text was void)."""
        return self._took(self._handle.get(timeout))

    async def aresult(self, timeout: float | None = None) -> GenerateResult:
        """result(), without blocking the event loop."""
        return self._took(await self._handle.wait(timeout))

    def _took(self, result: GenerateResult) -> GenerateResult:
        self.text, self.finish_reason, self.model = result["text"], result["finish_reason"], result["model"]
        self.prompt_tokens, self.completion_tokens = result["prompt_tokens"], result["completion_tokens"]
        return result

    def __iter__(self) -> Iterator[str]:
        # A client of its own for the iteration, whose reads may block for BLOCK_S: a producer's shared
        # clients give a command only the connect timeout (a second at 1), which a silent second outlasts.
        client = redis_client(self._backend_url, self._sentinel_master, **self._reader_timeouts())
        deadline = time.monotonic() + self._timeout
        try:
            while self.finish_reason is None:
                with self._errors():
                    reply = client.xread({self._key: self._last}, count=COUNT, block=self._block_ms(deadline))
                    if reply:
                        deadline = time.monotonic() + self._timeout
                    elif self._handle.ready():
                        reply = client.xread({self._key: self._last}, count=COUNT)  # its last entries, if any
                        if not reply:
                            yield from self._from_result()
                            return
                for piece in self._pieces(reply):
                    if piece:
                        yield piece
        finally:
            client.close()

    def _reader_timeouts(self) -> dict[str, float]:
        return {"socket_connect_timeout": self._connect_timeout,
                "socket_timeout": BLOCK_S + self._connect_timeout}  # a read never hangs

    async def __aiter__(self) -> AsyncIterator[str]:
        # A connection of its own for the iteration: an asyncio client belongs to one event loop, and a
        # blocking XREAD holds its connection, so streams read side by side cannot share one anyway.
        client = async_redis_client(self._backend_url, self._sentinel_master, **self._reader_timeouts())
        deadline = time.monotonic() + self._timeout
        try:
            while self.finish_reason is None:
                with self._errors():
                    reply = await client.xread({self._key: self._last}, count=COUNT, block=self._block_ms(deadline))
                    if reply:
                        deadline = time.monotonic() + self._timeout
                    elif await asyncio.to_thread(self._handle.ready):
                        reply = await client.xread({self._key: self._last}, count=COUNT)
                        if not reply:
                            for piece in await asyncio.to_thread(lambda: list(self._from_result())):
                                yield piece
                            return
                for piece in self._pieces(reply):
                    if piece:
                        yield piece
        finally:
            await client.aclose()

    @property
    def _key(self) -> str:
        return stream_key(self.id)

    def _errors(self) -> ConnectionErrors:
        return ConnectionErrors(f"the result backend at {redact(self._backend_url)}")

    def _block_ms(self, deadline: float) -> int:
        """How long the next XREAD may block; ResultTimeout once the stream has been silent for its timeout
        (a stream's whole length is not bounded: a long generation goes on while its pieces come)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ResultTimeout(f"the stream of task {self.id} gave nothing for {self._timeout:g} s; the task "
                                "may still run")
        return max(1, int(min(left, BLOCK_S) * 1000))

    def _pieces(self, reply: Any) -> Iterator[str]:
        """The text each entry of an XREAD reply adds (raises for an error or restart entry), moving the
        stream's place past it."""
        for entry_id, fields in reply[0][1] if reply else ():
            self._last = entry_id
            yield self._apply({_str(name): _str(value) for name, value in fields.items()})

    def _apply(self, fields: dict[str, str]) -> str:
        event = fields.get("event")
        if event == "text":
            piece = fields.get("text", "")
            self.text += piece
            return piece
        if event == "end":
            self.finish_reason, self.model = fields.get("finish_reason"), fields.get("model")
            self.prompt_tokens = int(fields.get("prompt_tokens", 0))
            self.completion_tokens = int(fields.get("completion_tokens", 0))
        elif event == "error":
            error = TASK_ERRORS.get(fields.get("type", ""), InferqError)
            raise error(fields.get("message", "the generation failed"))
        elif event == "restart":
            void, self.text = len(self.text), ""  # reading on gives the new delivery's text, from its start
            raise StreamRestarted(f"the worker streaming task {self.id} died, and its next delivery decoded a "
                                  f"different text; the {void} characters read are void: read on for the new "
                                  "text from its start, or wait for result()")
        return ""

    def _from_result(self) -> Iterator[str]:
        result: GenerateResult = self._handle.get(1.0)  # raises the task's own error if it failed
        self.finish_reason, self.model = result["finish_reason"], result["model"]
        self.prompt_tokens, self.completion_tokens = result["prompt_tokens"], result["completion_tokens"]
        if not result["text"].startswith(self.text):
            raise StreamRestarted(f"task {self.id}'s result does not start with the {len(self.text)} characters its "
                                  "stream gave (a later delivery decoded a different text): use result()")
        piece = result["text"][len(self.text):]
        if piece:
            self.text += piece
            yield piece


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def request_cancel(client: Redis, task_id: str, keep: int) -> None:
    """Cancel a generate task: its key first, then the publish, so a worker sees one or the other (see
    workers/receiving/cancels.py); the key is kept ``keep`` seconds for a message not taken yet."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(cancel_key(task_id), 1, ex=keep)
        pipe.publish(CANCEL_CHANNEL, task_id)
        pipe.execute()
