"""The fast path: ordinary task messages run without a task thread each, and are answered per batch.

Celery runs every message on a pool thread: the consumer builds a Request, hands it to a thread, the thread
waits for the device loop, stores its result (a Redis round trip), and hands the acknowledgement back to the
consumer (another round trip). With hundreds of single-text messages a second, those thread hand-offs and
round trips cost more worker CPU than the model on a small machine (a tiny model topped out near 240
messages/s on two cores). Here the consumer validates and tokenises a message itself and gives it to the
device loop; one finisher thread takes the answers as batches complete, builds every result, stores them in
one pipelined round trip, sends their task events, and acknowledges them in one more.

What a caller, Flower or a foreign client sees is unchanged: each message keeps its own result, its own
success or typed failure, its own task-received/started/succeeded/failed events, and a late acknowledgement
after its result is stored (a worker dying before that leaves the message to be redelivered). Anything out
of the ordinary takes Celery's own path: a redelivered message (it needs the poison quarantine), an ETA or
expiry, a revoked id, a message that is not protocol-2 JSON, or anything this path cannot decode.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import reprlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import torch
from celery import Celery, bootsteps
from celery.utils.saferepr import saferepr
from celery.worker.strategy import default as default_strategy

from producer.contract import message_priority
from producer.errors import InferqError
from producer.settings import Kind
from workers.device.runtime import Pending, Runtime, stream_requested
from workers.receiving.backend import STORE_REFUSED
from workers.receiving.counters import SharedCounter
from workers.receiving.envelopes import triple_problem
from workers.receiving.events import plain, send_task_events
from workers.receiving.result_repr import result_repr
from workers.receiving.transport import free_room, put_back_running_at_close

log = logging.getLogger(__name__)

_paths = SharedCounter("fast_path", "celery_path")


def path_counts() -> dict[str, int]:
    """Messages this worker ran on the fast path, and on Celery's own (inferq_status's ``paths``)."""
    return _paths.snapshot()


@dataclass(slots=True)
class _Task:
    task_id: str
    name: str
    kind: Kind
    message: Any
    started: float
    pending: Pending | None = None
    deadline: float = 0.0
    done: bool = False
    outcome: Any = None  # a Result, or the exception it failed with
    order: int = 0  # a tie-breaker in the deadline heap
    stream: bool = False  # a generate message that asked for a stream
    answered: bool = False  # stored and acknowledged (or given up on): a late outcome is dropped

    def let_go(self) -> None:
        """Answered: keep no message, result or future. The deadline heap holds a task until its time limit,
        and the future's callback holds the task (a reference cycle): kept whole, a backlog's answered tasks
        lived on into the collector's oldest generation, whose sweeps walked them all."""
        self.answered = True
        self.message = self.outcome = self.pending = None


@dataclass
class _Deadlines:
    """A note to the finisher: watch these tasks' time limits."""

    tasks: list[_Task]


class FastPath:
    """One per worker: what the consumer's strategies hand messages to, and the finisher thread."""

    def __init__(self, app: Celery, runtime: Callable[[], Runtime]) -> None:
        self._app = app
        self._runtime = runtime
        self._consumer: Any = None
        self._finished: queue.SimpleQueue[_Task | _Deadlines | list[_Task]] = queue.SimpleQueue()
        # tasks begun on the device since the last flush, whose limits the finisher is yet to watch
        self._new_deadlines: list[_Task] = []
        self._gathering = threading.local()  # .tasks: the hand-overs gathered by this thread (``gathered``)
        self._deadlines: list[tuple[float, int, _Task]] = []  # heap, touched by the finisher thread only
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._ticking = False  # the consumer's event loop calls _flush_device every turn
        self._wired = False  # the runtime's hand-offs and answers are set up for this path (at its first message)
        # task name -> what takes one of its messages if this path may run it (True), before Celery's dispatch:
        # the consumer calls it first (``InferqConsumer``), sparing each message Celery's two promises
        self.direct: dict[str, Callable[[Any], bool]] = {}

    # --- the consumer's side ----------------------------------------------------------------------------

    def strategy(self, kind: Kind) -> Callable[..., Any]:
        """A Celery task strategy (``Task.Strategy``) for one kind's task."""
        fast = self

        def start_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
            slow = default_strategy(task, app, consumer, **kwargs)
            fast._consumer = consumer
            hub = getattr(consumer, "hub", None)
            if hub is not None:
                hub.on_tick.add(fast._flush_device)  # a set: one entry however many kinds
                fast._ticking = True
            revoked = consumer.controller.state.revoked

            def take(message: Any) -> bool:
                decoded = fast._ordinary(message, revoked)
                if decoded is None:
                    return False
                _paths.add("fast_path")
                fast._take(kind, task.name, message, *decoded)
                return True

            def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any) -> Any:
                if body is None and not callbacks and take(message):
                    return None
                _paths.add("celery_path")
                return slow(message, body, ack, reject, callbacks, **options)

            fast.direct[task.name] = take
            return handle

        return start_strategy

    def _ordinary(self, message: Any, revoked: Any) -> tuple[Any, Any] | None:
        """(args, kwargs) of a message this path may run; None sends it down Celery's own path."""
        if self._runtime_or_none() is None:
            return None
        headers = message.headers
        info = message.delivery_info or {}
        if (not isinstance(headers, dict) or headers.get("eta") or headers.get("expires") or info.get("redelivered")
                or message.content_type != "application/json"):
            return None
        task_id = headers.get("id")
        if not isinstance(task_id, str) or task_id in revoked:
            return None
        try:
            payload = message.decode()
        except Exception:  # Celery's path refuses it with the right error and counts it
            return None
        # a protocol-1 body (a dict with "args") goes Celery's way; a malformed one the consumer refuses
        if not isinstance(payload, list | tuple) or triple_problem(payload) is not None:
            return None
        return payload[0], payload[1]

    def _runtime_or_none(self) -> Runtime | None:
        try:
            return self._runtime()
        except Exception:
            return None

    def _take(self, kind: Kind, name: str, message: Any, args: Any, kwargs: dict[str, Any]) -> None:
        headers = message.headers
        task = _Task(headers["id"], name, kind, message, time.monotonic(), order=next(self._order),
                     stream=kind == "generate" and stream_requested(kwargs))
        hold = getattr(message.channel.qos, "hold", None)  # our transport's QoS
        if hold is not None:
            hold(message.delivery_tag)
        with self._lock:
            self._in_flight += 1
        runtime = self._runtime()
        if runtime.settings.task_events_detail == "all":
            received = {"uuid": task.task_id, "name": name, "args": _repr(headers.get("argsrepr"), args),
                        "kwargs": _repr(headers.get("kwargsrepr"), kwargs), "root_id": headers.get("root_id"),
                        "parent_id": headers.get("parent_id"), "retries": headers.get("retries", 0), "eta": None,
                        "expires": None}
            # what came from the message's headers may be anything its sender wrote (the rest is ours)
            self._send_events([("task-received", received), ("task-started", {"uuid": task.task_id})],
                              plain(received["args"], received["kwargs"], received["root_id"],
                                    received["parent_id"], received["retries"]))
        if not self._wired:
            # the device side answers its batches inside ``gathered``; what this thread hands the device is
            # held until the event loop's next turn flushes it (without an event loop, sent at once)
            runtime.answer_together(self.gathered)
            if self._ticking:
                runtime.hold_hand_offs()
            self._wired = True
        try:
            pending = runtime.begin(kind, args, kwargs, task.task_id,
                                    message_priority((message.properties or {}).get("priority")))
        except Exception as exc:  # bad input: InvalidInput, UnknownModel, ...; answered at once
            task.done, task.outcome = True, exc
            self._hand_over(task)
            return
        task.pending = pending
        task.deadline = time.monotonic() + pending.limit
        pending.future.add_done_callback(lambda _: self._hand_over(task))
        self._new_deadlines.append(task)
        if not self._ticking:
            self.hand_over_deadlines()

    def _flush_device(self) -> None:
        """Once per turn of the consumer's event loop: send what this turn's messages prepared."""
        self.hand_over_deadlines()
        runtime = self._runtime_or_none()
        if runtime is not None:
            runtime.flush_hand_offs()

    def _hand_over(self, task: _Task) -> None:
        gathering: list[_Task] | None = getattr(self._gathering, "tasks", None)
        if gathering is not None:
            gathering.append(task)
            return
        self._ensure_finisher()
        self._finished.put(task)

    def hand_over_deadlines(self) -> None:
        """The limits of the tasks begun since the last call, to the finisher in one note: a note per message
        woke the finisher for each (the consumer's thread only)."""
        if self._new_deadlines:
            tasks, self._new_deadlines = self._new_deadlines, []
            self._ensure_finisher()
            self._finished.put(_Deadlines(tasks))

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Requests answered by this thread inside the block go to the finisher together, at its end: the
        device side answers a batch at a time, and a hand-over per request woke the finisher for each (1.2
        wake-ups a message in a receiver draining a backlog)."""
        gathered: list[_Task] = []
        self._gathering.tasks = gathered
        try:
            yield
        finally:
            self._gathering.tasks = None
            if gathered:
                self._ensure_finisher()
                self._finished.put(gathered)

    def _send_events(self, events: list[tuple[str, dict[str, Any]]], all_plain: bool) -> None:
        send_task_events(getattr(self._consumer, "event_dispatcher", None), events, all_plain)

    def longest_limit(self) -> float:
        runtime = self._runtime_or_none()
        if runtime is None:
            return 0.0
        return runtime.settings.time_limits.longest

    def drain(self, timeout: float) -> int:
        """Waits until every message taken has been answered and acknowledged; how many are left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._in_flight

    # --- the finisher thread ------------------------------------------------------------------------------

    def _ensure_finisher(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._finish_forever, name="inferq-finisher",
                                                    daemon=True)
                    self._thread.start()

    def _finish_forever(self) -> None:
        while True:
            try:
                self._finish_some()
            except Exception:  # never let the thread die: the messages would hang until redelivered
                log.exception("the fast path's finisher failed; continuing")

    def _finish_some(self) -> None:
        wait = None
        if self._deadlines:
            wait = max(0.0, self._deadlines[0][0] - time.monotonic())
        try:
            first = self._finished.get(timeout=wait)
        except queue.Empty:
            first = None
        arrived = [first] if first is not None else []
        while True:
            try:
                arrived.append(self._finished.get_nowait())
            except queue.Empty:
                break
        ready: list[_Task] = []
        for item in (one for entry in arrived for one in (entry if isinstance(entry, list) else (entry,))):
            if isinstance(item, _Deadlines):
                for task in item.tasks:
                    if not task.done:
                        heapq.heappush(self._deadlines, (task.deadline, task.order, task))
            elif item.answered:
                continue  # its outcome came after it was answered at its time limit
            elif item.done and item.pending is None:
                ready.append(item)  # failed before reaching the device
            elif not item.done:
                item.done = True
                item.outcome = self._outcome(item)
                ready.append(item)
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, task = heapq.heappop(self._deadlines)
            if not task.done and task.pending is not None:
                task.pending.future.cancel()  # still queued: the device loop skips it
                task.done, task.outcome = True, self._runtime().timed_out(task.pending)
                ready.append(task)
        if ready:
            self._answer(ready)

    def _outcome(self, task: _Task) -> Any:
        pending = task.pending
        assert pending is not None
        runtime = self._runtime()
        try:
            return pending.build(pending.future.result(timeout=0))
        except CancelledError:  # by the finisher at its time limit, or by its caller
            return runtime.cancelled(pending)
        except torch.OutOfMemoryError as exc:
            return runtime.out_of_memory(pending, exc)
        except Exception as exc:
            return exc

    def _answer(self, tasks: list[_Task]) -> None:
        """Store every result (successes in one round trip), send the events, then acknowledge them all."""
        backend = self._app.backend
        runtime = self._runtime()
        for task in tasks:
            if task.kind == "generate":
                runtime.settle(task.task_id, task.stream, task.outcome)
        succeeded = [task for task in tasks if not isinstance(task.outcome, BaseException)]
        failed = [task for task in tasks if isinstance(task.outcome, BaseException)]
        stored: list[_Task] = []
        try:
            if succeeded:
                backend.store_successes([(task.task_id, task.outcome) for task in succeeded])
                stored += succeeded
        except STORE_REFUSED as refused:  # Redis said why (READONLY, OOM, gone): its word is the whole story
            log.error("could not store %d results (%s: %s); their messages stay unacknowledged and come back "
                      "after the visibility timeout", len(succeeded), type(refused).__name__, refused)
        except Exception:
            log.exception("could not store %d results; their messages stay unacknowledged and come back after "
                          "the visibility timeout", len(succeeded))
        for task in failed:
            exc = task.outcome
            try:
                backend.mark_as_failure(task.task_id, exc, None if isinstance(exc, InferqError) else
                                        "".join(traceback.format_exception(exc)))
                stored.append(task)
            except STORE_REFUSED as refused:
                log.error("could not store the failure of task %s (%s); its message comes back later", task.task_id,
                          refused)
            except Exception:
                log.exception("could not store the failure of task %s; its message comes back later", task.task_id)
        now = time.monotonic()
        # with outcomes only, no task-received told Flower the task's name: the outcome carries it
        named = runtime.settings.task_events_detail == "all"
        events: list[tuple[str, dict[str, Any]]] = []
        for task in stored:
            if isinstance(task.outcome, BaseException):
                exc = task.outcome
                if isinstance(exc, InferqError):
                    log.info("Task %s[%s] raised expected: %s", task.name, task.task_id, exc)
                else:
                    log.error("Task %s[%s] raised unexpected: %r", task.name, task.task_id, exc)
                fields = {"uuid": task.task_id, "exception": saferepr(exc), "traceback": None}
                events.append(("task-failed", fields))
            else:
                fields = {"uuid": task.task_id, "runtime": now - task.started, "result": result_repr(task.outcome)}
                events.append(("task-succeeded", fields))
            if not named:
                fields["name"] = task.name
        self._send_events(events, all_plain=True)  # ids, names, reprs and a runtime
        self._acknowledge(stored)
        if len(stored) < len(tasks):
            kept = {id(task) for task in stored}
            self._let_go([task for task in tasks if id(task) not in kept])
        for task in tasks:
            task.let_go()
        with self._idle:
            self._in_flight -= len(tasks)
            self._idle.notify_all()

    def _acknowledge(self, tasks: list[_Task]) -> None:
        for messages in _by_channel(tasks):
            try:
                messages[0].channel.qos.ack_many(messages)
            except Exception as exc:  # Redis went away: they come back, find their answers, and are not rerun
                log.error("could not acknowledge %d messages (%s); they come back after the visibility timeout",
                          len(messages), exc)
                free_room(messages)

    def _let_go(self, tasks: list[_Task]) -> None:
        """Messages whose results could not be stored: unacknowledged, out of their channel's prefetch window."""
        for messages in _by_channel(tasks):
            free_room(messages)


# What a task-received event shows of a message's arguments, as Celery's own producer cuts its argsrepr: a
# foreign client that sends none would otherwise put a whole request (megabytes) in each event, through Redis
# pub/sub to Flower, which keeps it in memory.
# reprlib looks at the first items of each list only: saferepr walked all of a 5-million-item list (0.8 s).
REPR_MAX = 1024
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 4, 16, 16, 16, 200, 200


def _repr(sent: Any, value: Any) -> Any:
    """The repr a message's header gave, cut to REPR_MAX if it is a string; else a bounded repr of ``value``."""
    if sent:
        return sent[:REPR_MAX] if isinstance(sent, str) else sent
    return _REPR.repr(value)[:REPR_MAX]


def _by_channel(tasks: list[_Task]) -> list[list[Any]]:
    by_channel: dict[int, list[Any]] = {}
    for task in tasks:
        by_channel.setdefault(id(task.message.channel), []).append(task.message)
    return list(by_channel.values())


class DrainFastPath(bootsteps.StartStopStep):  # type: ignore[misc]
    """At a warm shutdown, after the consumer stopped taking messages and before its connection closes (which
    would put every unacknowledged message back on its queue): answer what the fast path holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def shutdown(self, consumer: Any) -> None:
        fast: FastPath | None = getattr(consumer.app, "inferq_fast_path", None)
        if fast is None:
            return
        fast.hand_over_deadlines()  # those of the last turn's messages: their limits still hold while draining
        left = fast.drain(timeout=max(fast.longest_limit(), 1.0) + 5.0)
        put_back_running_at_close()
        if left:
            log.warning("stopping with %d fast-path message(s) unanswered; they go back to their queue", left)
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()  # the drained messages' events, before the dispatcher closes
