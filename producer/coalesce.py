"""Coalescing in the producer: concurrent embed/classify calls in one process share one message.

A web process with many requests in flight would otherwise pay Celery's per-message cost once per
request, on both sides. Here calls that arrive within ``window`` seconds of each other and share their
options (kind, model, normalize / labels, top_k) go out as one task carrying all their texts; the answer
is split back, each caller getting exactly its own rows. One background thread sends the groups and is
told of each answer: it subscribes to a message's result channel (the worker publishes each result there as
it stores it, which Celery's own result consumer relies on too) before sending it, so nothing polls. Polling
every millisecond with MGET cost 1.5 ms of producer CPU per request under load, and at light load it
competed with the model for a small machine's cores (a lone call took 20 ms against 14 without
coalescing). Once a second the thread also reads the stored results of what is still in flight, so an
answer is not missed while Redis restarts or if it was published before its subscription took effect.

Like Nagle's algorithm, the window only applies while earlier messages are in flight: a call that finds
nothing in flight goes out at once, so a lone request pays no window.

A merged message that fails with an error that can come from one request's texts (InvalidInput,
InputTooLarge, OutOfMemory, PoisonMessage, or an error not inferq's own) is sent again one request per
message, so a bad request fails alone and its neighbours still get their answers. One that fails for all of
them alike (UnknownModel) fails every caller with that error: sent again, each would fail the same way. One
that ran past its time limit (TaskTimeout) is sent again in two halves, each of which may be halved again:
the merge may have made it too long to run, but sent again one by one, a merged message that timed out on an
overloaded device would come back as hundreds.
Each caller gets exactly one outcome, whatever the others do: a caller that gives up waiting (an asyncio
timeout cancels what it awaits) cannot cancel the future its neighbours' answers are set on, and no
exception of one group ends the thread that serves them all. A group that is never answered (its message
lost with a Redis that kept nothing) fails with ResultTimeout once ``expire_after`` seconds have passed,
and a closed client fails what is still in flight after a grace period, so nothing waits forever and the
thread ends; calls made after close() are sent alone, as without coalescing. The message stays an
ordinary ``inferq.embed`` / ``inferq.classify`` task: workers, Flower and foreign clients see nothing special.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from producer.app import publish
from producer.connection import ConnectionErrors
from producer.errors import InferqConnectionError, ResultTimeout, TaskTimeout, UnknownModel
from producer.results import final_meta, outcome
from producer.settings import Kind, redact

log = logging.getLogger(__name__)
SWEEP_SECONDS = 1.0  # how often the stored results of what is still in flight are read
MIN_WAIT = 0.001  # the shortest wait for answers: a group due sooner goes out at most this late
OUTAGE_WAIT = 0.1  # between attempts to reach Redis again for notices
CLOSE_GRACE = 5.0  # how long a closed client's thread still waits for the answers in flight
# A merged message's errors that cannot depend on which texts it carried: every caller gets them as they are.
SHARED_ERRORS = (UnknownModel,)


@dataclass
class _Call:
    texts: list[str]
    future: Future[Any]


@dataclass
class _Group:
    kind: Kind
    options: dict[str, Any]
    priority: int
    opened: float
    calls: list[_Call] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(call.texts) for call in self.calls)


def split_result(kind: Kind, result: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Cut a merged result into one result per call, in order."""
    rows_key = "embeddings" if kind == "embed" else "results"
    rows = result[rows_key]
    if len(rows) != sum(sizes):
        raise RuntimeError(f"merged {kind} result has {len(rows)} rows for {sum(sizes)} texts")
    # the merged message's token count is every caller's texts together; each caller's own is the sum over
    # its texts' counts, where the worker sent them (an older one did not: then no caller gets a count)
    if len(sizes) == 1:
        return [result]  # one caller's texts alone: the whole count is its own
    shared = {key: value for key, value in result.items() if key not in ("prompt_tokens", "text_tokens")}
    counts = result.get("text_tokens")
    if counts is not None and (len(counts) != len(rows) or not all(isinstance(count, int) for count in counts)):
        log.warning("a merged %s result's text_tokens do not match its %d rows; its callers get no token count",
                    kind, len(rows))
        counts = None  # the vectors are still right: only the counts are left out
    parts, start = [], 0
    for size in sizes:
        part = {**shared, rows_key: rows[start:start + size]}
        if counts is not None:
            part["text_tokens"] = counts[start:start + size]
            part["prompt_tokens"] = sum(part["text_tokens"])
        parts.append(part)
        start += size
    return parts


class Coalescer:
    def __init__(self, app: Celery, window: float, max_texts: int,
                 send_alone: Callable[[Kind, dict[str, Any], int], Any], expire_after: float) -> None:
        self._app = app
        self._expire_after = expire_after  # an in-flight group unanswered this long fails with ResultTimeout
        self._closed_at: float | None = None  # when close() was called; None while open
        self._window = window
        self._max_texts = max_texts
        self._send_alone = send_alone  # the client's normal path, for retrying a failed merge one by one
        self._broker = f"the broker at {redact(str(app.conf.broker_url))}"  # for connection errors
        self._lock = threading.Condition()
        self._open: dict[Hashable, _Group] = {}
        self._full: list[_Group] = []  # groups closed by size, for the thread to send at once
        self._inflight: dict[str, _Group] = {}  # result key -> its group
        self._notices_lost = False  # the thread's own: whether the last wait for notices failed
        self._thread = threading.Thread(target=self._run, name="inferq-coalescer", daemon=True)
        self._thread.start()

    def submit(self, kind: Kind, texts: list[str], options: dict[str, Any],
               priority: int = 0) -> Future[Any] | None:
        """The future of one call's answer; None once closed (the caller sends it alone, as it would
        without coalescing)."""
        future: Future[Any] = Future()
        # running: a caller that stops waiting (asyncio's wait_for cancels the future it wraps) cannot cancel it,
        # and so cannot make setting its outcome raise in the thread that answers its whole group
        future.set_running_or_notify_cancel()
        key = (kind, priority, tuple(sorted((k, _hashable(v)) for k, v in options.items())))
        with self._lock:
            if self._closed:
                return None
            group = self._open.get(key)
            if group is not None and group.size + len(texts) > self._max_texts:
                self._full.append(self._open.pop(key))
                group = None
            if group is None:
                group = self._open[key] = _Group(kind, options, priority, time.monotonic())
            group.calls.append(_Call(list(texts), future))
            self._lock.notify()
        return future

    def close(self, wait: bool = True) -> None:
        """Send what is open, answer or fail what is in flight (``CLOSE_GRACE``), and end the thread; with
        ``wait`` false (a client being collected), without waiting for it."""
        with self._lock:
            if self._closed_at is None:
                self._closed_at = time.monotonic()
            self._lock.notify()
        if wait:
            self._thread.join(timeout=CLOSE_GRACE + 5)

    @property
    def _closed(self) -> bool:
        return self._closed_at is not None

    # --- the background thread: the only one that sends, subscribes and reads answers -------------------

    def _run(self) -> None:
        answers = self._app.backend.client.pubsub()
        last_sweep = time.monotonic()
        try:
            while True:
                try:
                    if not self._turn(answers):
                        return
                except Exception:  # a bug here must not strand every call of the process: log it, go on
                    log.exception("the coalescer's thread failed a turn; it goes on")
                    time.sleep(OUTAGE_WAIT)
                if time.monotonic() - last_sweep >= SWEEP_SECONDS:
                    last_sweep = time.monotonic()
                    self._sweep(answers)
        finally:
            answers.close()

    def _turn(self, answers: Any) -> bool:
        """Send what is due and take the answers that came; False once closed with nothing left to do."""
        with self._lock:
            now = time.monotonic()
            idle = not self._inflight  # nothing to wait for: merging would only add latency
            due, self._full = self._full, []
            due += [self._open.pop(key) for key in [k for k, g in self._open.items()
                                                     if idle or now - g.opened >= self._window or self._closed]]
            if not due and idle:
                if self._closed:
                    return False
                waits = [g.opened + self._window - now for g in self._open.values()]
                self._lock.wait(timeout=max(min(waits), 0.0) if waits else SWEEP_SECONDS)
                return True
            # new calls do not wake a thread waiting on the socket: wake when the next group is due
            wait = min([g.opened + self._window - now for g in self._open.values()] + [self._window])
        for group in due:
            self._send(group, answers)
        self._receive(answers, max(wait, MIN_WAIT))
        return True

    def _send(self, group: _Group, answers: Any) -> None:
        """Subscribe to the answer's channel, then publish one merged message."""
        texts = [text for call in group.calls for text in call.texts]
        task_id = str(uuid.uuid4())
        key = self._app.backend.get_key_for_task(task_id).decode()
        try:
            answers.subscribe(key)
        except Exception as exc:  # Redis is away: the message may still go out; the sweep finds its answer
            log.warning("could not subscribe to a result channel (%s); its answer will be read within %g s",
                        exc, SWEEP_SECONDS)
        try:
            with ConnectionErrors(self._broker):
                publish(self._app, group.kind, {**group.options, "texts": texts}, group.priority, task_id)
        except Exception as exc:  # each caller gets the error a call of its own would have raised
            with contextlib.suppress(Exception):  # no answer will come on that channel
                answers.unsubscribe(key)
            _fail(group, exc)
            return
        with self._lock:
            self._inflight[key] = group

    def _receive(self, answers: Any, timeout: float) -> None:
        """Wait up to ``timeout`` for answers, then take every one already here."""
        landed: list[str] = []
        try:
            message = answers.get_message(timeout=timeout)
            while message is not None:
                if message["type"] == "message":
                    key = message["channel"].decode()
                    self._resolve(key, message["data"])
                    if key not in self._inflight:  # answered (or by the sweep before): no more notices
                        landed.append(key)
                message = answers.get_message(timeout=0.0)
            if landed:
                answers.unsubscribe(*landed)
        except Exception as exc:  # Redis restarting: the sweep reads what was stored meanwhile
            if not self._notices_lost:  # once per outage, not once per wait
                log.warning("result notifications interrupted (%s); reading stored results instead", exc)
                self._notices_lost = True
            time.sleep(max(timeout, OUTAGE_WAIT))
            return
        if self._notices_lost:
            log.info("result notifications are back")
            self._notices_lost = False

    def _sweep(self, answers: Any) -> None:
        """Read the stored results of what is in flight (a notice lost, or sent before the subscription took
        effect); fail the groups unanswered past ``expire_after``, or past the grace of a closed client."""
        now = time.monotonic()
        with self._lock:
            closing = self._closed_at is not None and now - self._closed_at >= CLOSE_GRACE
            expired = {key: group for key, group in self._inflight.items()
                       if closing or now - group.opened >= self._expire_after}
            for key in expired:
                del self._inflight[key]
            keys = list(self._inflight)
        for group in expired.values():
            _fail(group, ResultTimeout(
                f"a coalesced {group.kind} request gave no result within {now - group.opened:.0f} s"
                + ("; the client was closed" if closing else "")))
        if expired:
            with contextlib.suppress(Exception):  # Redis away: the connection's subscriptions go with it
                answers.unsubscribe(*expired)
        if not keys:
            return
        try:
            values = self._app.backend.client.mget(keys)
            found = [key for key, value in zip(keys, values, strict=True)
                     if value is not None and self._resolve(key, value)]
            if found:
                answers.unsubscribe(*found)
        except Exception as exc:
            if not self._notices_lost:  # during an outage the lost notices were logged already
                log.warning("could not read stored results (%s); retrying", exc)

    def _resolve(self, key: str, value: bytes) -> bool:
        """Answer a group's callers from its stored result; False if it is not final, or already answered."""
        backend = self._app.backend
        meta = final_meta(backend, value)
        if meta is None:
            return False
        with self._lock:
            group = self._inflight.pop(key, None)
        if group is None:
            return False
        if meta["status"] == "SUCCESS":
            try:  # every part before any caller is told: a result that does not split fails them all alike
                parts = split_result(group.kind, meta["result"], [len(c.texts) for c in group.calls])
            except Exception as exc:
                _fail(group, exc)
                return True
            for call, part in zip(group.calls, parts, strict=True):
                _settle(call.future, result=part)
        else:
            try:
                outcome(backend, meta)
                failure: Exception = RuntimeError(f"the task ended {meta['status']}")  # never so, but answered
            except Exception as exc:
                failure = exc
            if len(group.calls) == 1 or isinstance(failure, SHARED_ERRORS):
                _fail(group, failure)
                return True
            if isinstance(failure, TaskTimeout):
                log.info("a merged %s message of %d requests ran past its time limit; sending it again in two "
                         "halves", group.kind, len(group.calls))
                half = len(group.calls) // 2
                with self._lock:  # for this thread's next turn, with the callers' own deadline (opened)
                    self._full += [_Group(group.kind, group.options, group.priority, group.opened, calls)
                                   for calls in (group.calls[:half], group.calls[half:])]
                return True
            log.info("a merged %s message of %d requests failed; sending them one by one", group.kind,
                     len(group.calls))
            threading.Thread(target=self._one_by_one, args=(group,), daemon=True).start()
        return True

    def _one_by_one(self, group: _Group) -> None:
        deadline = group.opened + self._expire_after  # the callers' own wait, not one more per call
        handles = []
        for index, call in enumerate(group.calls):
            try:
                handles.append((call, self._send_alone(group.kind, {**group.options, "texts": call.texts},
                                                       group.priority)))
            except InferqConnectionError as exc:  # the broker is away for the rest too: tell them now
                for left in group.calls[index:]:
                    _settle(left.future, exc=exc)
                break
            except Exception as exc:  # its own bad input, or anything else: its own outcome
                _settle(call.future, exc=exc)
        for call, handle in handles:
            try:
                _settle(call.future, result=handle.get(max(deadline - time.monotonic(), 0.01)))
            except Exception as exc:  # each caller gets its own outcome, whatever it is
                _settle(call.future, exc=exc)


def _settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """A caller's outcome, set once: a second (a group failed after its callers were answered) is dropped."""
    with contextlib.suppress(InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _fail(group: _Group, exc: BaseException) -> None:
    for call in group.calls:
        _settle(call.future, exc=exc)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value
