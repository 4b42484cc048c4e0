"""The Python producer: validate, enqueue by task name, and wait for results (blocking or asyncio).

It speaks only the public contract (task names, queues, JSON kwargs), so a worker cannot tell it from a
foreign client, and it checks every request before sending it so most mistakes never reach the queue.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar, cast

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from producer.app import make_celery, publish
from producer.coalesce import Coalescer
from producer.connection import ConnectionErrors
from producer.contract import (
    LANE_PRIORITY,
    LANES,
    ClassifyResult,
    EmbedResult,
    GenerateResult,
    Lane,
    validate,
)
from producer.errors import InferqError, InvalidInput, ResultTimeout
from producer.settings import Kind, Settings, redact
from producer.streaming import GenerationStream, request_cancel

T = TypeVar("T")

# Results still referenced when Python exits (a ResultTimeout's traceback keeps its frames, and the handle, to
# the end): AsyncResult.__del__ then unsubscribes from the result channel after imports have stopped working
# and prints "Exception ignored ... sys.meta_path is None". At exit, while imports still work, they let go.
_live_results: weakref.WeakSet[AsyncResult] = weakref.WeakSet()


@atexit.register
def _let_go_of_results() -> None:
    for result in list(_live_results):
        with contextlib.suppress(Exception):  # Redis may be gone already: nothing left to unsubscribe from
            result.backend.remove_pending_result(result)
        result.backend = None  # so __del__, later, does nothing


class Handle(Generic[T]):
    """One enqueued task: poll it, wait for it, or await it."""

    def __init__(self, result: AsyncResult, default_timeout: float, backend_url: str) -> None:
        self._result = result
        _live_results.add(result)
        self._default_timeout = default_timeout
        self._backend_url = backend_url

    @property
    def id(self) -> str:
        return str(self._result.id)

    def ready(self) -> bool:
        with self._translate_errors():
            return bool(self._result.ready())

    def get(self, timeout: float | None = None) -> T:
        """The result; raises the task's own error (InvalidInput, UnknownModel, ...) if it failed."""
        wait = _seconds(timeout, self._default_timeout)
        deadline = time.monotonic() + wait
        with self._translate_errors():
            # Celery's result consumer waits in steps of one second, so its get() overshoots any fraction
            # (0.1 s took 1.0, 2.5 took 3.0): told of the result for the whole seconds, then polling the rest.
            if not math.isfinite(wait):
                return cast(T, self._result.get(timeout=None, propagate=True, interval=0.05))
            whole = int(wait)
            if whole >= 1:
                with contextlib.suppress(CeleryTimeoutError):
                    return cast(T, self._result.get(timeout=whole, propagate=True, interval=0.05))
            while not self._result.ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResultTimeout(f"task {self.id} gave no result within {wait:g} s; it may still run, "
                                        "and get() can be called again")
                time.sleep(min(0.02, left))
            return cast(T, self._result.get(timeout=1.0, propagate=True, interval=0.05))

    async def wait(self, timeout: float | None = None) -> T:
        """Like get(), without blocking the event loop: polls the result backend with a short backoff."""
        wait = _seconds(timeout, self._default_timeout)
        deadline = time.monotonic() + wait
        delay = 0.005
        while not await asyncio.to_thread(self.ready):
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"task {self.id} gave no result within {wait:g} s; it may still run")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return await asyncio.to_thread(self.get, 1.0)

    def _translate_errors(self) -> ConnectionErrors:
        return ConnectionErrors(f"the result backend at {redact(self._backend_url)}")


class FutureHandle(Handle[T]):
    """A request riding in a coalesced message: its answer is its own slice of the merged result."""

    def __init__(self, future: Future[T], default_timeout: float) -> None:
        self._future = future
        self._default_timeout = default_timeout

    @property
    def id(self) -> str:
        return "coalesced"  # several calls share one message; there is no task id of this call's own

    def ready(self) -> bool:
        return self._future.done()

    def get(self, timeout: float | None = None) -> T:
        wait = _seconds(timeout, self._default_timeout)
        try:
            return self._future.result(timeout=wait if math.isfinite(wait) else None)
        except FutureTimeout:
            raise ResultTimeout(f"a coalesced request gave no result within {wait:g} s") from None

    async def wait(self, timeout: float | None = None) -> T:
        wait = _seconds(timeout, self._default_timeout)
        try:  # the future is running: timing out here cancels the wrapper only, and it can be awaited again
            return await asyncio.wait_for(asyncio.wrap_future(self._future), wait if math.isfinite(wait) else None)
        except TimeoutError:
            raise ResultTimeout(f"a coalesced request gave no result within {wait:g} s") from None


class Client:
    """Enqueue inferq tasks. Thread-safe; make one per process and share it."""

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or Settings()
        self.app = app or make_celery(self.settings, "inferq-producer")
        # Celery gives each thread a result backend of its own, and a handle subscribes (at send) on its
        # thread's: every one a handle of ours was made with, so close() can forget all their subscriptions
        self._backends: weakref.WeakSet[Any] = weakref.WeakSet()
        self._backends_lock = threading.Lock()  # a WeakSet changed while close() reads it would raise
        self._coalescer: Coalescer | None = None
        if self.settings.coalesce_ms > 0:
            # a merged message unanswered a minute past the callers' wait is given up (a Redis that lost it)
            self._coalescer = Coalescer(self.app, self.settings.coalesce_ms / 1000, self.settings.limits.max_texts,
                                        _weak_send(self), expire_after=self.settings.result_timeout + 60)
            # a client dropped without close() lets its thread end: the thread holds it only weakly
            weakref.finalize(self, self._coalescer.close, False)

    # --- generic --------------------------------------------------------------------------------------

    def submit(self, kind: Kind, /, *, priority: Lane = "interactive", **kwargs: Any) -> Handle[Any]:
        """Validate kwargs against the contract and enqueue them; None values are left out.

        ``priority``: ``"bulk"`` work waits behind every interactive message of its queue, in Redis and on
        the device (for jobs nobody is waiting on: files, backfills); interactive is the default."""
        if priority not in LANE_PRIORITY:
            raise InvalidInput(f"priority must be one of {', '.join(LANES)}, not {priority!r}")
        # A tuple (or any iterable) of texts, labels or stop strings is the list the contract takes, here as in
        # submit_embed() and the others.
        sent = {key: _as_list(value) if key in LIST_ARGUMENTS else value
                for key, value in kwargs.items() if value is not None}
        validate(kind, sent, self.settings.limits)
        if self._coalescer is not None and kind != "generate":
            options = {key: value for key, value in sent.items() if key != "texts"}
            future = self._coalescer.submit(kind, sent["texts"], options, LANE_PRIORITY[priority])
            if future is not None:  # None: the client is closed, and sends it alone
                return FutureHandle(future, self.settings.result_timeout)
        return self._send(kind, sent, LANE_PRIORITY[priority])

    def _send(self, kind: Kind, kwargs: dict[str, Any], priority: int = 0) -> Handle[Any]:
        with ConnectionErrors(f"the broker or result backend at {_both(self.settings)}"):
            result = publish(self.app, kind, kwargs, priority)
        self._made_on(result)
        return Handle(result, self.settings.result_timeout, self.settings.backend)

    def _made_on(self, result: AsyncResult) -> None:
        with self._backends_lock:
            self._backends.add(result.backend)

    def handle(self, task_id: str) -> Handle[Any]:
        """A handle for a task sent earlier (by this or any other process)."""
        result = AsyncResult(task_id, app=self.app)
        self._made_on(result)
        return Handle(result, self.settings.result_timeout, self.settings.backend)

    def cancel(self, task_id: str) -> None:
        """Cancel a generate task: a worker running it stops it before its next decoding step, and one that
        takes it later does not run it; it fails with Cancelled (its stream ends so too). Embed and
        classify tasks are not cancelled (they take milliseconds)."""
        with ConnectionErrors(f"the result backend at {redact(self.settings.backend)}"):
            request_cancel(self.app.backend.client, task_id, self.settings.stream_ttl)

    def close(self) -> None:
        if self._coalescer is not None:
            self._coalescer.close()
        # Handles dropped after close() unsubscribe from their result channel as they are collected; with
        # Redis gone, each unsubscribe would retry its reconnect for seconds (400 dropped handles stalled a
        # process for minutes). A closed client forgets its subscriptions instead, on every thread's backend
        # (a handle made on a producer thread and read on another subscribed on the first one's). Only this
        # thread's consumer is stopped: another thread may still be reading a result on its own.
        with self._backends_lock:
            backends = {*self._backends, self.app.backend}
        for backend in backends:
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                consumer.subscribed_to.clear()
                if backend is self.app.backend:
                    consumer.stop()
        self.app.close()

    # --- embed ----------------------------------------------------------------------------------------

    def submit_embed(self, texts: Sequence[str], *, model: str | None = None, normalize: bool = True,
                     priority: Lane = "interactive") -> Handle[EmbedResult]:
        return self.submit("embed", priority=priority, texts=_as_list(texts), model=model, normalize=normalize)

    def embed(self, texts: Sequence[str], *, model: str | None = None, normalize: bool = True,
              timeout: float | None = None, priority: Lane = "interactive") -> EmbedResult:
        return self.submit_embed(texts, model=model, normalize=normalize, priority=priority).get(timeout)

    async def aembed(self, texts: Sequence[str], *, model: str | None = None, normalize: bool = True,
                     timeout: float | None = None, priority: Lane = "interactive") -> EmbedResult:
        # sent from a thread: a send blocks for up to connect_timeout (and WAIT for replicas) where Redis is slow
        handle = await asyncio.to_thread(self.submit_embed, texts, model=model, normalize=normalize, priority=priority)
        return await handle.wait(timeout)

    # --- classify -------------------------------------------------------------------------------------

    def submit_classify(self, texts: Sequence[str], *, labels: Sequence[str] | None = None, top_k: int = 1,
                        model: str | None = None, priority: Lane = "interactive") -> Handle[ClassifyResult]:
        return self.submit("classify", priority=priority, texts=_as_list(texts),
                           labels=_as_list(labels) if labels is not None else None, top_k=top_k, model=model)

    def classify(self, texts: Sequence[str], *, labels: Sequence[str] | None = None, top_k: int = 1,
                 model: str | None = None, timeout: float | None = None,
                 priority: Lane = "interactive") -> ClassifyResult:
        return self.submit_classify(texts, labels=labels, top_k=top_k, model=model, priority=priority).get(timeout)

    async def aclassify(self, texts: Sequence[str], *, labels: Sequence[str] | None = None, top_k: int = 1,
                        model: str | None = None, timeout: float | None = None,
                        priority: Lane = "interactive") -> ClassifyResult:
        handle = await asyncio.to_thread(self.submit_classify, texts, labels=labels, top_k=top_k, model=model,
                                         priority=priority)  # sent from a thread, as aembed's
        return await handle.wait(timeout)

    # --- generate -------------------------------------------------------------------------------------

    def submit_generate(self, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                        max_new_tokens: int = 64, fit_new_tokens: bool = False, temperature: float = 0.0,
                        top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                        model: str | None = None, stream: bool = False,
                        priority: Lane = "interactive") -> Handle[GenerateResult]:
        return self.submit("generate", priority=priority, prompt=prompt,
                           messages=_as_messages(messages) if messages is not None else None,
                           max_new_tokens=max_new_tokens, fit_new_tokens=fit_new_tokens or None,
                           temperature=temperature, top_p=top_p,
                           stop=_as_list(stop) if stop is not None else None, seed=seed, model=model,
                           stream=stream or None)  # stream="no" reaches validation, which refuses it

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **options: Any) -> GenerateResult:
        return self.submit_generate(prompt, **options).get(timeout)

    def stream_generate(self, prompt: str | None = None, *, timeout: float | None = None,
                        **options: Any) -> GenerationStream:
        """Generate with the text streamed as it is decoded: iterate over the returned stream (``for``, or
        ``async for``) for pieces of text (joined, they are the result's text); it raises the task's error if
        it fails. In an event loop, ``await astream_generate(...)`` sends without blocking the loop."""
        silence = _seconds(timeout, self.settings.result_timeout)
        return self._stream(self.submit_generate(prompt, stream=True, **options), silence)

    async def astream_generate(self, prompt: str | None = None, *, timeout: float | None = None,
                               **options: Any) -> GenerationStream:
        """``stream_generate`` for an event loop: the send (up to ``connect_timeout``, and a WAIT for replicas)
        runs in a thread, as ``agenerate``'s does; then ``async for`` over the stream."""
        silence = _seconds(timeout, self.settings.result_timeout)
        handle = await asyncio.to_thread(self.submit_generate, prompt, stream=True, **options)
        return self._stream(handle, silence)

    def _stream(self, handle: Handle[GenerateResult], silence: float) -> GenerationStream:
        return GenerationStream(handle, silence, self.settings.backend, self.cancel,
                                self.settings.connect_timeout, self.settings.sentinel_master)

    async def agenerate(self, prompt: str | None = None, *, timeout: float | None = None,
                        **options: Any) -> GenerateResult:
        handle = await asyncio.to_thread(self.submit_generate, prompt, **options)  # sent from a thread, as aembed's
        return await handle.wait(timeout)


def _weak_send(client: Client) -> Callable[[Kind, dict[str, Any], int], Handle[Any]]:
    """``client._send`` for the coalescer's thread, without keeping the client alive."""
    send = weakref.WeakMethod(client._send)

    def send_alone(kind: Kind, kwargs: dict[str, Any], priority: int) -> Handle[Any]:
        method = send()
        if method is None:
            raise InferqError("the client was dropped before its merged message could be sent again")
        return method(kind, kwargs, priority)

    return send_alone


def _both(settings: Settings) -> str:
    broker, backend = redact(settings.broker), redact(settings.backend)
    return broker if broker == backend else f"{broker} / {backend}"


def _seconds(timeout: Any, default: float) -> float:
    """A wait in seconds (``inf``: no bound); NaN or a negative one would wait forever or not at all."""
    wait = default if timeout is None else timeout
    if isinstance(wait, bool) or not isinstance(wait, int | float) or math.isnan(wait) or wait < 0:
        raise InvalidInput(f"timeout must be a number of seconds >= 0 (or None for the default); got {wait!r}")
    return float(wait)


LIST_ARGUMENTS = frozenset({"texts", "labels", "stop", "messages"})


def _as_list(values: Any) -> Any:
    """Any iterable (a tuple, a generator, a numpy array, a pandas Series) as the list the contract takes;
    anything else as it is, so validation names the mistake: a bare string is an iterable of characters, a
    mapping one of its keys, and 5 none at all."""
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        return values
    return list(values)


def _as_messages(messages: Any) -> Any:
    """Each message as a plain dict (a TypedDict, a mapping); anything else as it is, for validation to name."""
    listed = _as_list(messages)
    if not isinstance(listed, list):
        return listed
    return [dict(message) if isinstance(message, Mapping) else message for message in listed]
