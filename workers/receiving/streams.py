"""Streamed generations: each ``stream: true`` generate task's text goes to a Redis Stream as it is decoded.

The device loop tells the request what it decoded after every step (a few token ids); this module's one
thread turns them into text and writes it to the task's stream (``contract.stream_key``) on the result
backend's Redis. Neither the device loop nor the consumer ever waits on Redis for it, and what arrived
while the last write was under way goes out in the next one: one round trip carries every stream's news.

Only settled text is written (``generate.settled_text``): never what a stop string could still cut off,
never half of a multi-byte character, so the text entries, joined, are exactly the result's text.

Entries (every field a string; any Redis client reads them with XREAD or XRANGE):
- ``event=text``, ``text``: the next piece of text;
- ``event=end``, ``finish_reason``, ``model``, ``prompt_tokens``, ``completion_tokens``: the last entry of
  a generation that finished;
- ``event=error``, ``type``, ``message``: the last entry of one that failed (``type`` as a stored failure's
  ``exc_type``: TaskTimeout, Cancelled, InvalidInput, ...);
- ``event=restart``: the text so far is void, and the generation is written again from the start. A
  message delivered again after its worker died picks up where the stream stopped when it decodes the
  same text (greedy, seeded, or sampled with the seed taken from its task id, as it is without a seed);
  only if its text differs (a device whose numbers changed with the batch) does it restart.

The stream expires ``stream_ttl`` seconds after its last entry (every write sets it again), and holds at
most one text entry per token of each delivery (so ``(max_new_tokens + 2) x max_deliveries`` entries):
XADD trims to that bound. If Redis cannot be written to, the writes are tried again every second, and
what a failed write may have left there is read back first, so the stream still gets every piece once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from producer.contract import stream_key

log = logging.getLogger(__name__)
WARN_EVERY_S = 30.0
RETRY_S = 1.0  # how soon writes that failed are tried again


@dataclass(eq=False)
class _Stream:
    task_id: str
    settled: Callable[[list[int]], str] | None  # tokens -> the text that is final so far; None: never decoded
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # the text the stream holds in Redis (after a resume: what an earlier delivery wrote)
    closed: bool = False  # the stream's last entry is written: nothing more to write
    synced: bool = False  # ``shown`` and ``closed`` are known to be what Redis holds (read by _resume)
    outcome: Any = None  # the GenerateResult or the exception, once the request ended
    ended: bool = False


class StreamPublisher:
    def __init__(self, client: Redis, ttl: int, max_entries: int) -> None:
        self._client = client
        self._ttl = ttl
        self._max_entries = max_entries
        self._queue: queue.SimpleQueue[tuple[str, _Stream, Any]] = queue.SimpleQueue()
        self._open: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._dirty: dict[_Stream, None] = {}  # streams with news not written yet, in the order they came
        self._warned_at = 0.0
        threading.Thread(target=self._run, name="inferq-streams", daemon=True).start()

    def open(self, task_id: str, settled: Callable[[list[int]], str]) -> Callable[[list[int] | None], None]:
        """Start a task's stream; returns what the device side calls with each step's new tokens (None: the
        generation starts again from scratch, its batch having failed a step)."""
        stream = _Stream(task_id, settled)
        with self._lock:
            self._open[task_id] = stream
        self._queue.put(("open", stream, None))
        return lambda produced: self._queue.put(("tokens", stream, produced))

    def end(self, task_id: str, outcome: Any, requested: bool) -> None:
        """The task's outcome (a GenerateResult or the exception it failed with): its stream's last entries.
        ``requested``: it asked for a stream; one that failed before its stream opened (bad input) still
        gets its error entry, or a reader would wait for nothing."""
        with self._lock:
            stream = self._open.pop(task_id, None)
        if stream is None:
            if not requested or not isinstance(outcome, BaseException):
                return
            stream = _Stream(task_id, None)
        self._queue.put(("end", stream, outcome))

    # --- the publishing thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            items: list[tuple[str, _Stream, Any]] = []
            with contextlib.suppress(queue.Empty):  # news, or (writes owed after a failure) a retry in RETRY_S
                items.append(self._queue.get(timeout=RETRY_S if self._dirty else None))
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for tag, stream, value in items:
                if tag == "tokens" and value is None:
                    stream.tokens = []  # decoded again from the start: text it differs in restarts the stream
                elif tag == "tokens":
                    stream.tokens.extend(value)
                elif tag == "end":
                    stream.outcome, stream.ended = value, True
                self._dirty[stream] = None
            try:
                self._publish(list(self._dirty))
            except Exception as exc:  # Redis away: written once it answers (what it took is read back first)
                now = time.monotonic()
                if now - self._warned_at > WARN_EVERY_S:
                    self._warned_at = now
                    log.warning("could not write to generation streams (%s: %s); retrying (their results are "
                                "stored as always)", type(exc).__name__, exc)

    def _publish(self, streams: list[_Stream]) -> None:
        """Write what each stream lacks. Nothing here is taken as written until Redis said so: after a
        failure (even a pipeline half applied) a stream is read back from Redis before its next write."""
        self._resume([stream for stream in streams if not stream.synced])
        writes: list[tuple[_Stream, str, bool, int]] = []  # each stream's text and closed state once written
        with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                writes.append((stream, *self._write(pipe, stream), len(pipe)))
            try:
                replies = _per_key(pipe.execute(raise_on_error=False))
            except Exception:
                for stream in streams:
                    stream.synced = False
                raise
        start = 0
        for stream, shown, closed, end in writes:
            refused = next((reply for reply in replies[start:end] if isinstance(reply, Exception)), None)
            start = end
            if refused is not None:  # this stream's key alone: the others' writes stand
                self._drop(stream, refused)
            else:
                stream.shown, stream.closed = shown, closed
            del self._dirty[stream]

    def _drop(self, stream: _Stream, error: Exception) -> None:
        """A stream whose key holds something else: written no more, so one such key never stops every other
        stream; its result is stored as always."""
        log.warning("stream of task %s cannot be written (%s: %s); it is given up, its result is stored as always",
                    stream.task_id, type(error).__name__, error)
        stream.closed = stream.synced = True

    def _resume(self, streams: list[_Stream]) -> None:
        """What Redis holds of these streams: what earlier deliveries (or failed writes) left there."""
        if not streams:
            return
        with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrange(stream_key(stream.task_id))
            written = _per_key(pipe.execute(raise_on_error=False))
        for stream, entries in zip(streams, written, strict=True):
            if isinstance(entries, Exception):
                self._drop(stream, entries)
                continue
            stream.shown, stream.closed, stream.synced = "", False, True
            for _, fields in entries:
                event = fields.get(b"event")
                if event == b"text":
                    stream.shown += fields.get(b"text", b"").decode(errors="replace")  # a foreign writer's bytes
                elif event == b"restart":
                    stream.shown = ""
                elif event in (b"end", b"error"):
                    stream.closed = True

    def _write(self, pipe: Any, stream: _Stream) -> tuple[str, bool]:
        """Queue on ``pipe`` the entries the stream lacks; returns the text it holds, and whether it is
        closed, once they are written."""
        if stream.closed:
            return stream.shown, True
        entries: list[dict[str, Any]] = []
        shown = stream.shown
        if stream.ended:
            outcome = stream.outcome
            if isinstance(outcome, BaseException):
                entries.append({"event": "error", "type": type(outcome).__name__, "message": str(outcome)})
            else:
                shown = self._text(entries, shown, str(outcome["text"]), final=True)
                entries.append({"event": "end", "finish_reason": outcome["finish_reason"], "model": outcome["model"],
                                "prompt_tokens": outcome["prompt_tokens"],
                                "completion_tokens": outcome["completion_tokens"]})
        elif stream.settled is not None and stream.tokens:
            shown = self._text(entries, shown, stream.settled(stream.tokens))
        if entries:
            key = stream_key(stream.task_id)
            for fields in entries:
                pipe.xadd(key, fields, maxlen=self._max_entries, approximate=True)
            pipe.expire(key, self._ttl)  # with every write: the TTL counts from the stream's last entry
        return shown, stream.ended

    def _text(self, entries: list[dict[str, Any]], shown: str, text: str, final: bool = False) -> str:
        """Entries that take a stream holding ``shown`` to ``text``; returns what it then holds. ``final``: the
        result's text, which the stream must end holding exactly."""
        if text.startswith(shown):
            if len(text) > len(shown):
                entries.append({"event": "text", "text": text[len(shown):]})
            return text
        if shown.startswith(text) and not final:  # still catching up with an earlier delivery's text
            return shown
        entries.append({"event": "restart"})  # it differs from what an earlier delivery wrote
        return self._text(entries, "", text)


def _per_key(replies: list[Any]) -> list[Any]:
    """A pipeline's replies, where an error may only be one stream key's own (something else holds it):
    an error of Redis's state (READONLY during a failover, OOM under maxmemory, MISCONF) is raised, and the
    writes are tried again in a second."""
    passing = next((reply for reply in replies if isinstance(reply, Exception)
                    and not str(reply).startswith("WRONGTYPE")), None)
    if passing is not None:
        raise passing
    return replies
