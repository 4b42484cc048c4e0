"""The one thread that owns the device: it gathers waiting requests into batches and runs them.

Task threads ``submit`` a prepared request under a batch key (an operation on one model) and wait on the
returned future; the loop runs the oldest ready batch whenever the device is free. A batch's runner must
return exactly one outcome per request, in order; if the whole batch raises, it is split in halves and
retried, so one request that breaks a batch fails alone and its batch-mates still get their answers.
Requests that waited past their deadline fail with TaskTimeout without running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from producer.errors import TaskTimeout
from workers.device.batching import BatchLimits, BatchQueue, Waiting

log = logging.getLogger(__name__)

# runs one batch of payloads; returns one result (or exception) per payload, in order
Runner = Callable[[list[Any]], Sequence[Any]]


@dataclass
class BatchKind:
    runner: Runner
    limits: BatchLimits


@dataclass
class _Job:
    payload: Any
    future: Future[Any]
    timeout: float


class DeviceLoop:
    def __init__(self, kinds: dict[str, BatchKind], clock: Callable[[], float] = time.monotonic) -> None:
        self._kinds = kinds
        self._queues: dict[str, BatchQueue[_Job]] = {key: BatchQueue(kind.limits) for key, kind in kinds.items()}
        self._clock = clock
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy_since: float | None = None  # when the running batch started; None while idle
        # batch-size histogram per key, and counters, for inferq_status and the benchmark
        self.batch_sizes: dict[str, Counter[int]] = {key: Counter() for key in kinds}
        self.counts: Counter[str] = Counter()

    # --- task threads ---------------------------------------------------------------------------------

    def submit(self, key: str, payload: Any, items: int, longest: int, timeout: float) -> Future[Any]:
        future: Future[Any] = Future()
        now = self._clock()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the device loop is stopping")
            self._queues[key].put(_Job(payload, future, timeout), items, longest, now, deadline=now + timeout)
            self._wake.notify()
        return future

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inferq-device", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        """Batch sizes per key (requests per batch -> batches) and the counters, for ``inferq_status``."""
        return {"batch_sizes": {key: {str(size): n for size, n in sorted(hist.items())}
                                for key, hist in self.batch_sizes.items()},
                "counts": dict(self.counts)}

    @property
    def died(self) -> bool:
        """The loop thread ended without being asked to stop (a bug): nothing will run on the device again."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # --- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                picked = self._next(self._clock())
                while picked is None and not self._stopping:
                    self._wake.wait(timeout=self._sleep(self._clock()))
                    picked = self._next(self._clock())
                if picked is None:  # stopping, and nothing left to run
                    return
                key, batch = picked
                self.busy_since = self._clock()
                self.counts[f"{key}:texts"] += sum(waiting.items for waiting in batch)
            started = time.perf_counter()
            try:
                self._execute(key, [waiting.payload for waiting in batch])
            finally:
                self.busy_since = None
                # device time per model: busy_ms / batches against the raw model's pass shows what the
                # worker's other threads cost the device thread (the GIL), and busy_ms / wall time its load
                self.counts[f"{key}:busy_ms"] += round((time.perf_counter() - started) * 1000)

    def _next(self, now: float) -> tuple[str, list[Waiting[_Job]]] | None:
        """Expire late requests; then take a batch from the ready queue whose oldest request is oldest."""
        for key, queue in self._queues.items():
            for waiting in queue.expire(now):
                job = waiting.payload
                self.counts[f"{key}:expired"] += 1
                # Its task thread may have given up at the same limit and cancelled it: nothing to answer.
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(TaskTimeout(f"the request waited {now - waiting.arrived:.1f} s for "
                                                         f"the device, over its limit of {job.timeout:g} s"))
        ready = [(queue.oldest_arrival(), key) for key, queue in self._queues.items()
                 if queue.ready(now) or (self._stopping and len(queue))]
        if not ready:
            return None
        _, key = min(ready, key=lambda pair: pair[0] or 0.0)
        return key, self._queues[key].take()

    def _sleep(self, now: float) -> float | None:
        waits = [w for w in (q.seconds_until_ready(now) for q in self._queues.values()) if w is not None]
        return min(waits) if waits else None

    def _execute(self, key: str, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes[key][len(live)] += 1
        self.counts[f"{key}:batches"] += 1
        self.counts[f"{key}:requests"] += len(live)
        self._run_isolated(key, live)

    def _run_isolated(self, key: str, jobs: list[_Job]) -> None:
        try:
            outcomes = self._kinds[key].runner([job.payload for job in jobs])
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"batch runner for {key} returned {len(outcomes)} outcomes for {len(jobs)} "
                                   "requests")
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            # find the request that breaks the batch: its neighbours must still be answered
            log.warning("batch of %d on %s failed (%s: %s); retrying in halves", len(jobs), key,
                        type(exc).__name__, exc)
            middle = len(jobs) // 2
            self._run_isolated(key, jobs[:middle])
            self._run_isolated(key, jobs[middle:])
            return
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)


EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: the supervisor restarts the process


def exit_on_stall(loop: DeviceLoop, limit: float) -> None:
    """Watch a device loop from a thread of its own; end the process if the device stops making progress."""
    while True:
        time.sleep(min(5.0, limit / 4))
        busy_since = loop.busy_since
        if busy_since is not None and time.monotonic() - busy_since > limit:
            # A device that makes no progress cannot be recovered from inside: exit without acknowledging,
            # so the broker hands this worker's messages to another, and the supervisor restarts us.
            log.critical("the device made no progress for %.0f s (limit %g s); exiting",
                         time.monotonic() - busy_since, limit)
            os._exit(EXIT_DEVICE_FAILED)
        if loop.died:
            log.critical("the device loop thread died; exiting so the supervisor restarts this worker")
            os._exit(EXIT_DEVICE_FAILED)
