"""Coalescing in the producer: concurrent embed/classify calls in one process share one message.

A web process with many requests in flight would otherwise pay Celery's per-message cost once per
request, on both sides. Here calls that arrive within ``window`` seconds of each other and share their
options (kind, model, normalize / labels, top_k) go out as one task carrying all their texts; the answer
is split back, each caller getting exactly its own rows. One background thread sends the groups and
collects every in-flight answer with a single MGET per poll.

Like Nagle's algorithm, the window only applies while earlier messages are in flight: a call that finds
nothing in flight goes out at once, so a lone request pays no window.

A merged message that fails is sent again one request per message, so a bad request fails alone and
its neighbours still get their answers. The message stays an ordinary ``inferq.embed`` /
``inferq.classify`` task: workers, Flower and foreign clients see nothing special.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from producer.contract import queue_name, task_name
from producer.errors import InferqError
from producer.settings import Kind

log = logging.getLogger(__name__)


@dataclass
class _Call:
    texts: list[str]
    future: Future[Any]


@dataclass
class _Group:
    kind: Kind
    options: dict[str, Any]
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
    parts, start = [], 0
    for size in sizes:
        parts.append({**result, rows_key: rows[start:start + size]})
        start += size
    return parts


class Coalescer:
    def __init__(self, app: Celery, window: float, max_texts: int,
                 send_alone: Callable[[Kind, dict[str, Any]], Any]) -> None:
        self._app = app
        self._window = window
        self._max_texts = max_texts
        self._send_alone = send_alone  # the client's normal path, for retrying a failed merge one by one
        self._lock = threading.Condition()
        self._open: dict[Hashable, _Group] = {}
        self._inflight: dict[str, _Group] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inferq-coalescer", daemon=True)
        self._thread.start()

    def submit(self, kind: Kind, texts: list[str], options: dict[str, Any]) -> Future[Any]:
        future: Future[Any] = Future()
        key = (kind, tuple(sorted((k, _hashable(v)) for k, v in options.items())))
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            group = self._open.get(key)
            if group is not None and group.size + len(texts) > self._max_texts:
                self._send(self._open.pop(key))
                group = None
            if group is None:
                group = self._open[key] = _Group(kind, options, time.monotonic())
            group.calls.append(_Call(list(texts), future))
            self._lock.notify()
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=5)

    # --- the background thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                idle = not self._inflight  # nothing to wait for: merging would only add latency
                for key in [k for k, g in self._open.items()
                            if idle or now - g.opened >= self._window or self._closed]:
                    self._send(self._open.pop(key))
                if self._closed and not self._inflight:
                    return
                if not self._inflight:
                    waits = [g.opened + self._window - now for g in self._open.values()]
                    self._lock.wait(timeout=max(min(waits), 0.0) if waits else None)
                    continue
                ids = list(self._inflight)
            self._collect(ids)
            time.sleep(0.0005 if self._open else 0.001)

    def _send(self, group: _Group) -> None:
        """Publish one merged message (called with the lock held)."""
        texts = [text for call in group.calls for text in call.texts]
        try:
            result = self._app.send_task(task_name(group.kind), kwargs={**group.options, "texts": texts},
                                         queue=queue_name(group.kind))
        except Exception as exc:
            for call in group.calls:
                call.future.set_exception(exc)
            return
        self._inflight[str(result.id)] = group

    def _collect(self, ids: list[str]) -> None:
        backend = self._app.backend
        raw = backend.client.mget([backend.get_key_for_task(task_id) for task_id in ids])
        for task_id, value in zip(ids, raw, strict=True):
            if value is None:
                continue
            meta = backend.meta_from_decoded(backend.decode_result(value))
            if meta["status"] not in ("SUCCESS", "FAILURE", "REVOKED"):
                continue
            with self._lock:
                group = self._inflight.pop(task_id)
            if meta["status"] == "SUCCESS":
                for call, part in zip(group.calls, split_result(group.kind, meta["result"],
                                                                 [len(c.texts) for c in group.calls]), strict=True):
                    call.future.set_result(part)
            elif len(group.calls) == 1:
                group.calls[0].future.set_exception(backend.exception_to_python(meta["result"]))
            else:
                log.info("a merged %s message of %d requests failed; sending them one by one", group.kind,
                         len(group.calls))
                threading.Thread(target=self._one_by_one, args=(group,), daemon=True).start()

    def _one_by_one(self, group: _Group) -> None:
        handles = []
        for call in group.calls:
            try:
                handles.append((call, self._send_alone(group.kind, {**group.options, "texts": call.texts})))
            except InferqError as exc:
                call.future.set_exception(exc)
        for call, handle in handles:
            try:
                call.future.set_result(handle.get())
            except Exception as exc:  # each caller gets its own outcome, whatever it is
                call.future.set_exception(exc)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value
