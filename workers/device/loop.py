"""The one thread that owns the device: it gathers waiting requests into batches and runs them.

Task threads ``submit`` a prepared request under a batch key (an operation on one model) and wait on the
returned future; the loop runs the oldest ready batch whenever the device is free. A batch's runner must
return exactly one outcome per request, in order; if the whole batch raises, it is split in halves and
retried, so one request that breaks a batch fails alone and its batch-mates still get their answers.
Requests that waited past their deadline fail with TaskTimeout without running.

An error of the device itself (``torch.AcceleratorError``: an illegal memory access, a device-side assert,
an ECC error) is not a request's fault, and CUDA keeps failing every later call once it is raised: the loop
stops there without answering anything (``broken``), and the stall watch ends the process, so that the
messages it holds go to another worker and its supervisor starts it again. Split and retried like any
other error, every request it ran afterwards failed at once, and a worker that fails fast takes most of its
queue.

Generation runs a step at a time (a ``SteppedKind``): a started batch decodes one token per turn of the
loop, and between its steps the loop runs whatever else is ready (an encoder batch, a step of another
generate batch), so a long generation never holds embed, classify or a health check behind it. A row
answers as soon as it finishes, and a row past its deadline is answered with TaskTimeout and leaves the
batch before the next step: a request given up on stops using the device. So does a request cancelled by
its caller (``cancel``), answered with Cancelled. A request submitted with a ``progress`` callback is told
after every step what it produced in it (a streamed generation's new tokens).

A new stepped batch that is to join a running one (continuous batching) runs its prefill as steps of its
own, beside it (a long prompt's prefill in chunks, each one turn of the loop), and joins once the prefill
is done. The device's cache budget (``cache_budget``, bytes) bounds the stepped batches under way: each
reserves its requests x its longest input x its kind's cache bytes per token, and a batch that does not
fit waits for room, unless nothing else runs. Those rules live in ``workers/device/stepping.py``; this
module runs the batches and answers their requests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from producer.errors import TaskTimeout
from workers.device.batching import BatchLimits, BatchQueue, Waiting
from workers.device.jobs import Job, LeavingFailed, Progress, Runner, answer, ran_late, was_cancelled
from workers.device.metrics import ModelMetrics, outcome_label
from workers.device.stepping import RunningBatch, RunningBatches, SteppedKind

log = logging.getLogger(__name__)


class DeviceBroken(Exception):
    """The device itself failed (its cause): the loop stops."""


# torch 2.8 and later raise this for an error of the device; older releases a RuntimeError("CUDA error: ...")
_ACCELERATOR_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(torch, "AcceleratorError", None),) if error is not None)


def device_failed(exc: BaseException) -> bool:
    """An error of the device rather than of a request (an out-of-memory is not one)."""
    return isinstance(exc, _ACCELERATOR_ERRORS) or (type(exc) is RuntimeError
                                                      and str(exc).startswith("CUDA error:"))


@dataclass
class BatchKind:
    runner: Runner
    limits: BatchLimits


class DeviceLoop:
    def __init__(self, kinds: dict[str, BatchKind | SteppedKind],
                 clock: Callable[[], float] = time.monotonic, cache_budget: int | None = None) -> None:
        self._kinds = kinds
        # stepped batches under way, and the cache bytes they may reserve; only the loop thread touches them
        self._stepped: RunningBatches[Job] = RunningBatches(
            {key: kind for key, kind in kinds.items() if isinstance(kind, SteppedKind)}, cache_budget)
        self._running = self._stepped.batches  # the same list, for the loop's many reads
        self._cache_reserved = 0  # what they reserved at the end of the last turn (read by stats())
        self._queues: dict[str, BatchQueue[Job]] = {key: BatchQueue(kind.limits) for key, kind in kinds.items()}
        self._clock = clock
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cancelled: set[Future[Any]] = set()  # running requests to stop before their next step
        self.broken: BaseException | None = None  # the device error that stopped the loop
        self._given_up = False  # a waiting request was cancelled: _next takes it out of its queue
        self.busy_since: float | None = None  # when the running batch started; None while idle
        # what a batch's requests are answered inside (``Runtime.answer_together``)
        self.answering: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        # batch-size histogram per key, and counters, for inferq_status and the benchmark
        self.batch_sizes: dict[str, Counter[int]] = {key: Counter() for key in kinds}
        self.counts: Counter[str] = Counter()
        self._metrics = {key: ModelMetrics.of(key) for key in kinds}  # the same, and more, for Prometheus

    # --- task threads ---------------------------------------------------------------------------------

    def submit(self, key: str, payload: Any, items: int, longest: int, timeout: float,
               progress: Progress | None = None, priority: int = 0) -> Future[Any]:
        """Queue a request; ``priority`` is its message's (lower runs first: 0 interactive, 9 bulk)."""
        future: Future[Any] = Future()
        now = self._clock()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the device loop is stopping")
            self._queues[key].put(Job(payload, future, timeout, now + timeout, longest, progress), items, longest,
                                  now, deadline=now + timeout, priority=priority)
            self._wake.notify()
        return future

    def cancel(self, future: Future[Any]) -> None:
        """Give up on a submitted request: one still waiting is cancelled (never run); a running stepped one
        leaves its batch before the next step and fails with Cancelled; one that finished stays finished."""
        if future.done():
            return
        with self._wake:
            if future.cancel():
                self._given_up = True
            else:
                self._cancelled.add(future)
            self._wake.notify()

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inferq-device", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        """Batch sizes per key (requests per batch -> batches) and the counters, for ``inferq_status``."""
        stats: dict[str, Any] = {"batch_sizes": {key: {str(size): n for size, n in sorted(hist.items())}
                                                 for key, hist in self.batch_sizes.items()},
                                 "counts": dict(self.counts)}
        budget = self._stepped.cache_budget
        if budget is not None:
            stats["cache_mb"] = {"budget": round(budget / 2**20),
                                 "reserved": round(self._cache_reserved / 2**20)}
        return stats

    @property
    def died(self) -> bool:
        """The loop thread ended without being asked to stop (a bug): nothing will run on the device again."""
        return (self._thread is not None and not self._thread.is_alive()
                and (not self._stopping or self.broken is not None))

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # --- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._turns()
        except DeviceBroken as exc:
            self.broken = exc.__cause__
            log.critical("the device failed (%s: %s); nothing more runs on it", type(exc.__cause__).__name__,
                         exc.__cause__)

    def _turns(self) -> None:
        while True:
            with self._wake:
                picked = self._next(self._clock())
                while picked is None and not self._running and not self._stopping:
                    self._wake.wait(timeout=self._sleep(self._clock()))
                    picked = self._next(self._clock())
                if picked is None and not self._running:  # stopping, and nothing left to run
                    return
                if self._cancelled:  # forget cancels of requests that finished first (or never step)
                    self._cancelled = {future for future in self._cancelled if not future.done()}
            # one ready batch, then one step of every batch under way: fair turns on one device
            if picked is not None:
                key, batch, into = picked
                texts = sum(waiting.items for waiting in batch)
                self.counts[f"{key}:texts"] += texts
                metrics, now = self._metrics[key], self._clock()
                metrics.batch_texts.observe(texts)
                for waiting in batch:
                    metrics.queue_wait.observe(now - waiting.arrived)
                self._busy(key, self._execute, key, [waiting.payload for waiting in batch], into)
            # a stepped batch alone on an idle device has no one to make way for: no prefill chunks then
            alone = len(self._running) == 1 and not any(len(queue) for queue in self._queues.values())
            for running in list(self._running):
                self._busy(running.key, self._step, running, alone)
            if self._stepped.cache_budget is not None:
                self._cache_reserved = self._stepped.reserved()

    def _busy(self, key: str, work: Callable[..., None], *args: Any) -> None:
        self.busy_since = self._clock()
        started = time.perf_counter()
        try:
            work(*args)
        finally:
            self.busy_since = None
            # device time per model: busy_ms / batches against the raw model's pass shows what the
            # worker's other threads cost the device thread (the GIL), and busy_ms / wall time its load
            took = time.perf_counter() - started
            self.counts[f"{key}:busy_ms"] += round(took * 1000)
            metrics = self._metrics[key]
            metrics.busy.inc(took)
            metrics.run.observe(took)

    def _next(self, now: float) -> tuple[str, list[Waiting[Job]], RunningBatch[Job] | None] | None:
        """Expire late requests, and forget cancelled ones; then take a batch from the ready queue whose oldest
        request is oldest, with the stepped batch it is to join, if any."""
        if self._given_up:
            self._given_up = False
            for key, queue in self._queues.items():
                forgotten = queue.remove(lambda waiting: waiting.payload.future.cancelled())
                if forgotten:
                    self.counts[f"{key}:cancelled_waiting"] += len(forgotten)
        for key, queue in self._queues.items():
            for waiting in queue.expire(now):
                job = waiting.payload
                self.counts[f"{key}:expired"] += 1
                # Its task thread may have given up at the same limit and cancelled it: nothing to answer.
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(TaskTimeout(f"the request waited {now - waiting.arrived:.1f} s for "
                                                         f"the device, over its limit of {job.timeout:g} s"))
                    self._metrics[key].finished(Counter({"TaskTimeout": 1}))  # the overloaded device's sign
        # the next batch of each model is of its most urgent lane: urgent lanes first across models, then the
        # oldest; so the room kept for a request waiting for cache room is never kept from a more urgent one
        ready = [(queue.head() or (0, 0.0), key) for key, queue in self._queues.items()
                 if (queue.ready(now) or (self._stopping and len(queue)))
                 and (key not in self._stepped.kinds or self._stepped.may_take(key))]
        waits_for_room = False  # an older (or more urgent) request of a stepped kind waits for cache room
        for _, key in sorted(ready):
            if waits_for_room and key in self._stepped.kinds and self._stepped.cache_room(key) is not None:
                continue  # the room that frees is kept for it: newer requests of other models took it first
            picked = self._take(key)
            if picked is not None:  # else its oldest does not fit beside the batches under way: the next key
                return picked
            # its oldest request found no cache room (not its batches' limits, which are its own)
            waits_for_room = waits_for_room or (key in self._stepped.kinds and self._stepped.below_max_running(key)
                                                and self._stepped.cache_room(key) is not None)
        return None

    def _take(self, key: str) -> tuple[str, list[Waiting[Job]], RunningBatch[Job] | None] | None:
        """The batch to run next of this key, if its oldest request can start."""
        queue, stepped = self._queues[key], self._stepped
        if key not in stepped.kinds:
            return key, queue.take(), None
        into = stepped.roomiest(key)
        room = stepped.cache_room(key)
        if stepped.below_max_running(key):
            # a batch of its own, unless it fits into the roomiest one (see _start)
            batch = queue.take(room=room, alone=not self._running)
            if not batch:  # no room in the cache for its oldest request: it waits for rows to finish
                return None
            fits = into is not None and stepped.fits(into, sum(waiting.items for waiting in batch),
                                                     max(waiting.longest for waiting in batch))
            return key, batch, into if fits else None
        assert into is not None  # may_take: at max_running, only a batch with room lets this key take
        batch = queue.take(joining=into.live(), room=None if room is None else room + into.tokens(), alone=False)
        return (key, batch, into) if batch else None

    def _sleep(self, now: float) -> float | None:
        waits = [w for w in (q.seconds_until_ready(now) for q in self._queues.values()) if w is not None]
        return min(waits) if waits else None

    def _execute(self, key: str, jobs: list[Job], into: RunningBatch[Job] | None = None) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes[key][len(live)] += 1
        self._metrics[key].batch_requests.observe(len(live))
        self.counts[f"{key}:batches"] += 1
        self.counts[f"{key}:requests"] += len(live)
        if key in self._stepped.kinds:
            self._start(key, live, into)
        else:
            self._run_isolated(key, live)

    # --- stepped batches ------------------------------------------------------------------------------

    def _start(self, key: str, jobs: list[Job], into: RunningBatch[Job] | None = None) -> None:
        for job in jobs:  # a restart from scratch (after a failed step): what was told of it is void
            if job.reported and job.progress is not None:
                job.reported = 0
                self._tell(key, job, None)
        try:
            stepping = self._stepped.kinds[key].start([job.payload for job in jobs])
        except Exception as exc:  # a step's restart from scratch: in halves, as a failed step
            self._halve(key, jobs, exc, self._start)
            return
        # Its prefill runs as steps of its own (the loop's next turns), answering any request it finishes;
        # then it joins ``into`` (see _step).
        self._running.append(RunningBatch(key, dict(enumerate(jobs)), stepping, len(jobs), target=into))

    def _join(self, started: RunningBatch[Job]) -> None:
        """A new batch whose prefill is done joins the running batch it was taken for, if that still runs
        and still has room (in its limits and in the cache budget); else it goes on beside it."""
        into, key, stepped = started.target, started.key, self._stepped
        started.target = None
        if into is None or into not in self._running or into.stepping.prefilling or not started.jobs:
            return
        if not stepped.fits(into, *started.live()) or not stepped.join_fits_cache(started, into):
            return
        try:
            indices = into.stepping.absorb(started.stepping)
        except Exception:  # out of memory for the merged cache, say: both are as they were; it runs beside
            log.warning("a %s batch could not join a running one; it runs beside it", key, exc_info=True)
            return
        if indices is None:
            log.warning("%s batches cannot join running ones; they run side by side", key)
            stepped.never_join(key)
            return
        if indices != list(range(into.size, into.size + started.size)):
            raise RuntimeError(f"a joined {key} batch was given indices {indices} after {into.size} requests")
        self._running.remove(started)
        into.jobs.update({into.size + index: job for index, job in started.jobs.items()})
        into.size += started.size
        self.counts[f"{key}:joined"] += len(started.jobs)

    def _step(self, running: RunningBatch[Job], alone: bool = False) -> None:
        now = self._clock()
        outcomes: Counter[str] = Counter()
        started = time.perf_counter()
        try:
            for index, job in list(running.jobs.items()):
                if job.deadline <= now:
                    # its caller answers TaskTimeout at the same limit: stop spending the device on it
                    outcomes["TaskTimeout"] += 1
                    self._stop(running, index, "stopped", ran_late)
                elif job.future in self._cancelled:
                    with self._wake:
                        self._cancelled.discard(job.future)
                    outcomes["Cancelled"] += 1
                    self._stop(running, index, "cancelled", was_cancelled)
            prefill = running.stepping.prefilling
            if not prefill:
                self.counts[f"{running.key}:step_rows"] += len(running.jobs)  # occupancy: rows per step
            finished = running.stepping.step(alone) if not running.stepping.done else []
            self._count_tokens(running, prefill, started)
            for index, outcome in finished:
                if index in running.jobs:
                    outcomes[answer(running.jobs.pop(index), outcome)] += 1
            for index, job in running.jobs.items():
                if job.progress is not None:
                    self._report(running, index, job)
        except LeavingFailed as exc:
            self._metrics[running.key].finished(outcomes)
            self._running.remove(running)
            log.warning("a row could not leave its %s batch (%s); the rest start again", running.key, exc)
            restart = list(running.jobs.values())
        except Exception as exc:
            self._metrics[running.key].finished(outcomes)
            self._running.remove(running)
            # the rows still decoding start again from scratch (a seeded row gives the same text again)
            self._halve(running.key, list(running.jobs.values()), exc, self._start)
            return
        else:
            self._stepped_on(running, prefill, outcomes)
            return
        # A row that failed to leave is no fault of the others': even a lone one starts again rather than fail.
        # Out of the except block, so the failed batch (its frames in the traceback, their cache) is gone.
        if restart:
            self._start(running.key, restart)

    def _stepped_on(self, running: RunningBatch[Job], prefill: bool, outcomes: Counter[str]) -> None:
        """After a step that went well: count it; end the batch, or join it to its target once prefilled."""
        self._metrics[running.key].finished(outcomes)
        running.steps += 1
        self.counts[f"{running.key}:{'prefill_passes' if prefill else 'steps'}"] += 1
        if running.stepping.done or not running.jobs:
            self._running.remove(running)
            for job in running.jobs.values():  # a batch that ended without answering them all
                job.future.set_exception(RuntimeError(f"the {running.key} batch ended without an answer for this "
                                                      "request"))
            self._metrics[running.key].finished(Counter({"RuntimeError": len(running.jobs)}))
        elif running.target is not None and not running.stepping.prefilling:
            self._join(running)

    def _count_tokens(self, running: RunningBatch[Job], prefill: bool, started: float) -> None:
        """A decoding step gave each of its rows a token; the prefill's last chunk gave each its first."""
        metrics = self._metrics[running.key]
        if not prefill:
            metrics.tokens.inc(len(running.jobs))
            metrics.inter_token.observe(time.perf_counter() - started)
        elif not running.stepping.prefilling:
            now = self._clock()
            metrics.tokens.inc(len(running.jobs))  # the rows it finished are still here, answered after
            for job in running.jobs.values():
                metrics.first_token.observe(now - (job.deadline - job.timeout))  # deadline - timeout: its arrival

    def _stop(self, running: RunningBatch[Job], index: int, counted: str,
              error: Callable[[Job, int | None], Exception]) -> None:
        """Take a row out of its batch and answer it with ``error`` (given the steps it ran); answered even
        when taking it out fails (out of memory selecting the others' cache), which restarts the others."""
        job = running.jobs.pop(index)
        self.counts[f"{running.key}:{counted}"] += 1
        try:
            steps = running.stepping.stop(index)
        except Exception as exc:
            job.future.set_exception(error(job, None))
            raise LeavingFailed(exc) from exc
        job.future.set_exception(error(job, steps))

    def _report(self, running: RunningBatch[Job], index: int, job: Job) -> None:
        assert job.progress is not None
        produced = running.stepping.produced(index)
        if len(produced) <= job.reported:
            return
        new, job.reported = produced[job.reported:], len(produced)
        self._tell(running.key, job, new)

    def _tell(self, key: str, job: Job, new: list[Any] | None) -> None:
        assert job.progress is not None
        try:
            job.progress(new)
        except Exception:  # the listener's fault, not the batch's: the request still gets its answer
            log.exception("a %s request's progress listener failed", key)

    def _halve(self, key: str, jobs: list[Job], exc: Exception, again: Callable[[str, list[Job]], None]) -> None:
        """A batch that raised: a lone request fails with the error; the rest run ``again`` in halves, so the
        request that breaks the batch ends up failing alone and its neighbours are still answered."""
        if not jobs:
            return
        if device_failed(exc):
            raise DeviceBroken from exc  # their futures stay unanswered: their messages go to another worker
        if len(jobs) == 1:
            jobs[0].future.set_exception(exc)
            self._metrics[key].finished(Counter({outcome_label(exc): 1}))
            return
        log.warning("batch of %d on %s failed (%s: %s); retrying in halves", len(jobs), key, type(exc).__name__, exc)
        middle = len(jobs) // 2
        again(key, jobs[:middle])
        again(key, jobs[middle:])

    def _run_isolated(self, key: str, jobs: list[Job]) -> None:
        kind = self._kinds[key]
        assert isinstance(kind, BatchKind)
        try:
            outcomes = kind.runner([job.payload for job in jobs])
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"batch runner for {key} returned {len(outcomes)} outcomes for {len(jobs)} "
                                   "requests")
        except Exception as exc:
            self._halve(key, jobs, exc, self._run_isolated)
            return
        answered: Counter[str] = Counter()
        with self.answering():
            for job, outcome in zip(jobs, outcomes, strict=True):
                answered[answer(job, outcome)] += 1
        self._metrics[key].finished(answered)
