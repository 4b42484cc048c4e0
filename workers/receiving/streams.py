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

The stream expires ``stream_ttl`` seconds after this delivery's first entry, and holds at most one text
entry per token of each delivery (so ``(max_new_tokens + 2) x max_deliveries`` entries): XADD trims to
that bound. If Redis cannot be written to, the stream misses those entries and a warning is logged; the
result itself is stored as always, by the path every task takes.
"""

from __future__ import annotations

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


@dataclass(eq=False)
class _Stream:
    task_id: str
    settled: Callable[[list[int]], str] | None  # tokens -> the text that is final so far; None: never decoded
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # the text the stream holds (after a resume: what an earlier delivery wrote)
    closed: bool = False  # an earlier delivery wrote the last entry: nothing more to write
    started: bool = False  # this delivery wrote its first entry (and set the expiry)
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
        self._warned_at = 0.0
        threading.Thread(target=self._run, name="inferq-streams", daemon=True).start()

    def open(self, task_id: str, settled: Callable[[list[int]], str]) -> Callable[[list[int]], None]:
        """Start a task's stream; returns what the device side calls with each step's new tokens."""
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
            self._queue.put(("open", stream, None))
        self._queue.put(("end", stream, outcome))

    # --- the publishing thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._publish(items)
            except Exception as exc:  # Redis away: those entries are lost to their streams, not the results
                now = time.monotonic()
                if now - self._warned_at > WARN_EVERY_S:
                    self._warned_at = now
                    log.warning("could not write to generation streams (%s: %s); their results are stored as "
                                "always", type(exc).__name__, exc)

    def _publish(self, items: list[tuple[str, _Stream, Any]]) -> None:
        opened = [stream for tag, stream, _ in items if tag == "open"]
        if opened:
            self._resume(opened)
        touched: dict[_Stream, None] = {}  # in the order they were first touched
        for tag, stream, value in items:
            if tag == "tokens":
                stream.tokens.extend(value)
            elif tag == "end":
                stream.outcome, stream.ended = value, True
            touched[stream] = None
        with self._client.pipeline(transaction=False) as pipe:
            for stream in touched:
                self._write(pipe, stream)
            pipe.execute()

    def _resume(self, streams: list[_Stream]) -> None:
        """What earlier deliveries of these tasks already wrote (none, for a first delivery)."""
        with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrange(stream_key(stream.task_id))
            written = pipe.execute()
        for stream, entries in zip(streams, written, strict=True):
            for _, fields in entries:
                event = fields.get(b"event")
                if event == b"text":
                    stream.shown += fields.get(b"text", b"").decode()
                elif event == b"restart":
                    stream.shown = ""
                elif event in (b"end", b"error"):
                    stream.closed = True

    def _write(self, pipe: Any, stream: _Stream) -> None:
        if stream.closed:
            return
        if stream.ended:
            outcome = stream.outcome
            if isinstance(outcome, BaseException):
                self._add(pipe, stream, {"event": "error", "type": type(outcome).__name__, "message": str(outcome)})
            else:
                self._text(pipe, stream, str(outcome["text"]))
                self._add(pipe, stream, {"event": "end", "finish_reason": outcome["finish_reason"],
                                         "model": outcome["model"], "prompt_tokens": outcome["prompt_tokens"],
                                         "completion_tokens": outcome["completion_tokens"]})
            stream.closed = True
        elif stream.settled is not None and stream.tokens:
            self._text(pipe, stream, stream.settled(stream.tokens))

    def _text(self, pipe: Any, stream: _Stream, text: str) -> None:
        if text.startswith(stream.shown):
            if len(text) > len(stream.shown):
                self._add(pipe, stream, {"event": "text", "text": text[len(stream.shown):]})
                stream.shown = text
        elif not stream.shown.startswith(text):  # not catching up with an earlier delivery's text: it differs
            self._add(pipe, stream, {"event": "restart"})
            stream.shown = ""
            self._text(pipe, stream, text)

    def _add(self, pipe: Any, stream: _Stream, fields: dict[str, Any]) -> None:
        key = stream_key(stream.task_id)
        pipe.xadd(key, fields, maxlen=self._max_entries, approximate=True)
        if not stream.started:
            stream.started = True
            pipe.expire(key, self._ttl)
