"""The device loop with a plain Python runner: batching across threads, isolation of a failing request,
deadlines. (The real models run through it in the integration tests.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from producer.errors import TaskTimeout
from workers.device.batching import BatchLimits
from workers.device.loop import BatchKind, DeviceLoop


class Recorder:
    """Squares numbers in batches; refuses the payload 13 the way a model refuses a poisonous input."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.hold = hold

    def __call__(self, payloads: list[int]) -> Sequence[Any]:
        if self.hold is not None:
            self.hold.wait(timeout=10)
        self.batches.append(list(payloads))
        if 13 in payloads:
            raise ValueError("13 breaks the batch")
        return [p * p for p in payloads]


def make_loop(runner: Recorder, max_items: int = 8, max_wait: float = 0.05) -> DeviceLoop:
    loop = DeviceLoop({"square": BatchKind(runner, BatchLimits(max_items, 10_000, max_wait))})
    loop.start()
    return loop


def test_requests_waiting_together_run_as_one_batch_and_each_gets_its_own_answer() -> None:
    hold = threading.Event()
    runner = Recorder(hold)
    loop = make_loop(runner, max_items=8, max_wait=0.0)
    try:
        first = loop.submit("square", 1, items=1, longest=1, timeout=10)  # occupies the device...
        time.sleep(0.05)
        rest = [loop.submit("square", n, items=1, longest=1, timeout=10) for n in range(2, 8)]  # ...these wait
        hold.set()
        assert first.result(timeout=5) == 1
        assert [f.result(timeout=5) for f in rest] == [n * n for n in range(2, 8)]
        assert runner.batches == [[1], [2, 3, 4, 5, 6, 7]]
        assert loop.batch_sizes["square"] == {1: 1, 6: 1}
        assert loop.counts["square:requests"] == 7
    finally:
        loop.stop()


def test_a_request_that_breaks_its_batch_fails_alone() -> None:
    hold = threading.Event()
    runner = Recorder(hold)
    loop = make_loop(runner, max_items=8, max_wait=0.0)
    try:
        blocker = loop.submit("square", 0, items=1, longest=1, timeout=10)
        time.sleep(0.05)
        futures = {n: loop.submit("square", n, items=1, longest=1, timeout=10) for n in (11, 12, 13, 14, 15)}
        hold.set()
        blocker.result(timeout=5)
        for n, future in futures.items():
            if n == 13:
                with pytest.raises(ValueError, match="13 breaks the batch"):
                    future.result(timeout=5)
            else:
                assert future.result(timeout=5) == n * n
    finally:
        loop.stop()


def expire_behind_a_busy_device(cancel: bool) -> tuple[DeviceLoop, Recorder, Future[Any]]:
    """A loop whose device is busy with 2 while 3 waits past its 0.1 s limit (cancelled by its caller first,
    if `cancel`); returns once the device is free again."""
    hold = threading.Event()
    runner = Recorder(hold)
    loop = make_loop(runner, max_items=1, max_wait=0.0)
    busy = loop.submit("square", 2, items=1, longest=1, timeout=10)
    time.sleep(0.05)
    late: Future[Any] = loop.submit("square", 3, items=1, longest=1, timeout=0.1)
    if cancel:
        assert late.cancel()  # what a task thread does when its own wait runs out first
    time.sleep(0.3)
    hold.set()
    assert busy.result(timeout=5) == 4
    return loop, runner, late


def test_a_request_past_its_deadline_fails_with_task_timeout_and_never_runs() -> None:
    loop, runner, late = expire_behind_a_busy_device(cancel=False)
    try:
        with pytest.raises(TaskTimeout, match=r"waited .* over its limit of 0.1 s"):
            late.result(timeout=5)
        assert [3] not in runner.batches
        assert loop.counts["square:expired"] == 1
    finally:
        loop.stop()


def test_a_request_its_caller_cancelled_before_it_expired_does_not_stop_the_loop() -> None:
    loop, runner, _ = expire_behind_a_busy_device(cancel=True)
    try:
        assert loop.submit("square", 5, items=1, longest=1, timeout=5).result(timeout=5) == 25
        assert [3] not in runner.batches
        assert loop.counts["square:expired"] == 1
    finally:
        loop.stop()


def test_a_runner_that_loses_an_answer_is_caught() -> None:
    loop = DeviceLoop({"bad": BatchKind(lambda payloads: payloads[:-1], BatchLimits(4, 100, 0.0))})
    loop.start()
    try:
        with pytest.raises(RuntimeError, match="returned 0 outcomes for 1 requests"):
            loop.submit("bad", 1, items=1, longest=1, timeout=5).result(timeout=5)
    finally:
        loop.stop()
