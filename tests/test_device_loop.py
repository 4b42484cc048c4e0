"""The device loop with a plain Python runner: batching across threads, isolation of a failing request,
deadlines. (The real models run through it in the integration tests.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from producer.errors import Cancelled, TaskTimeout
from workers.device.batching import BatchLimits
from workers.device.loop import BatchKind, DeviceLoop
from workers.device.stepping import SteppedKind


class Recorder:
    """Squares numbers in batches; refuses the payload 13 the way a model refuses a poisonous input."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.hold = hold
        self.entered = threading.Event()  # a batch is on the device (held there until `hold` is set)

    def __call__(self, payloads: list[int]) -> Sequence[Any]:
        self.entered.set()
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
        assert runner.entered.wait(5)
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
        assert runner.entered.wait(5)
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
    assert runner.entered.wait(5)
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


class Countdown:
    """A stepped batch of plain numbers: a request of n finishes after n steps with the answer n; -1 breaks
    every step it is part of, as a poisonous input breaks a decoding step. Records each step's live rows."""

    def __init__(self, payloads: list[int], log: list[tuple[str, tuple[int, ...]]], pace: float,
                 prefill_steps: int = 0) -> None:
        self.left = {index: n for index, n in enumerate(payloads)}
        self.payloads, self.log, self.pace = payloads, log, pace
        self.prefill_left = prefill_steps  # steps that count nothing down first, as a chunked prefill's
        log.append(("start", tuple(payloads)))

    @property
    def done(self) -> bool:
        return not self.left

    @property
    def prefilling(self) -> bool:
        return self.prefill_left > 0

    def step(self, alone: bool = False) -> list[tuple[int, Any]]:
        if self.prefill_left > 0:
            self.prefill_left -= 1
            self.log.append(("prefill", tuple(self.payloads[index] for index in self.left)))
            time.sleep(self.pace)
            return []
        self.log.append(("step", tuple(self.payloads[index] for index in self.left)))
        time.sleep(self.pace)
        if Countdown.fail_next_step:
            Countdown.fail_next_step = False
            raise RuntimeError("a device hiccup")
        if any(self.payloads[index] == -1 for index in self.left):
            raise ValueError("-1 breaks the step")
        for index in self.left:
            self.left[index] -= 1
        finished = [index for index, n in self.left.items() if n <= 0]
        for index in finished:
            del self.left[index]
        if not self.left:
            self.log.append(("end", tuple(self.payloads)))
        return [(index, self.payloads[index]) for index in finished]

    refuse: str | None = None  # "none": its batches cannot be merged; "raise": merging fails (out of memory)
    fail_next_step = False  # set: the next step of any batch fails once (a device hiccup)
    stop_fails = False  # set: taking a row out fails (out of memory selecting the others' cache)

    def produced(self, index: int) -> list[int]:
        return list(range(self.payloads[index] - self.left.get(index, 0)))

    def absorb(self, other: Countdown) -> list[int] | None:
        if self.refuse == "raise":
            raise RuntimeError("out of memory while merging")
        if self.refuse == "none":
            return None
        offset = len(self.payloads)
        self.payloads = self.payloads + other.payloads
        self.left.update({offset + index: n for index, n in other.left.items()})
        self.log.append(("end", tuple(other.payloads)))  # it goes on inside this one
        other.left = {}
        return [offset + index for index in range(len(other.payloads))]

    def stop(self, index: int) -> int:
        if self.stop_fails:
            raise RuntimeError("out of memory in batch_select_indices")
        steps = self.payloads[index] - self.left.pop(index)
        self.log.append(("stop", (self.payloads[index],)))
        return steps


class Gate:
    """Holds a batch on the device (its runner calls ``pass_through``) until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def pass_through(self) -> None:
        self.entered.set()
        self.open.wait(timeout=10)


def stepped_loop(max_running: int = 2, pace: float = 0.01, joins: bool = False, max_items: int = 8,
                 max_tokens: int = 10_000, prefill_steps: int = 0, cache_budget: int | None = None,
                 gate: Gate | None = None) -> tuple[DeviceLoop, list[tuple[str, tuple[int, ...]]]]:
    """A loop of a stepped kind ("count", see Countdown) and a plain one ("square"; held at ``gate`` if given)."""
    log: list[tuple[str, tuple[int, ...]]] = []

    def square(payloads: list[int]) -> list[int]:
        if gate is not None:
            gate.pass_through()
        log.append(("square", tuple(payloads)))
        return [p * p for p in payloads]

    loop = DeviceLoop({
        "count": SteppedKind(lambda payloads: Countdown(payloads, log, pace, prefill_steps),
                             BatchLimits(max_items, max_tokens, 0.0), max_running, joins, cache_bytes_per_token=2),
        "square": BatchKind(square, BatchLimits(8, 10_000, 0.0))}, cache_budget=cache_budget)
    loop.start()
    return loop, log


def wait_started(log: list[tuple[str, tuple[int, ...]]], *payloads: int, what: str = "start") -> None:
    """Until the loop has started a stepped batch of exactly these requests (or run ``what`` of it: "step")."""
    deadline = time.monotonic() + 5
    while (what, payloads) not in log:
        assert time.monotonic() < deadline, f"no {what} of {payloads}: {log}"
        time.sleep(0.005)


def test_other_work_runs_between_the_steps_of_a_long_stepped_batch() -> None:
    loop, log = stepped_loop()
    try:
        long = loop.submit("count", 200, items=1, longest=1, timeout=30)  # about 2 s of steps
        wait_started(log, 200)
        assert loop.submit("square", 7, items=1, longest=1, timeout=30).result(timeout=5) == 49
        assert not long.done()  # it answered while the long batch was still running, not after it
        assert ("square", (7,)) in log
        assert long.result(timeout=10) == 200
        assert loop.counts["count:steps"] == 200
    finally:
        loop.stop()


def test_a_request_finishes_when_its_row_does_and_a_new_batch_starts_beside_a_running_one() -> None:
    gate = Gate()
    loop, log = stepped_loop(max_running=2, gate=gate)
    try:
        held = loop.submit("square", 0, items=1, longest=1, timeout=30)  # the device is busy...
        assert gate.entered.wait(5)
        first = [loop.submit("count", n, items=1, longest=1, timeout=30) for n in (3, 100)]  # ...so one batch
        gate.open.set()
        assert held.result(timeout=5) == 0
        assert first[0].result(timeout=5) == 3 and not first[1].done()  # answered at its own end
        late = loop.submit("count", 2, items=1, longest=1, timeout=30)
        assert late.result(timeout=5) == 2 and not first[1].done()  # a second batch, beside the first
        third = [loop.submit("count", n, items=1, longest=1, timeout=30) for n in (50,)]
        fourth = loop.submit("count", 1, items=1, longest=1, timeout=30)  # two already run: it waits its turn
        assert [f.result(timeout=10) for f in (*first, *third, fourth)] == [3, 100, 50, 1]
        steps = [rows for what, rows in log if what == "step"]
        assert (3, 100) in steps and (100,) in steps  # the row of 3 left its batch when it finished
        under_way = peak = 0
        for what, _ in log:
            under_way += {"start": 1, "end": -1}.get(what, 0)
            peak = max(peak, under_way)
        assert peak == 2  # never more batches at once than max_running
    finally:
        loop.stop()


def test_a_row_past_its_deadline_is_stopped_and_the_others_go_on() -> None:
    loop, log = stepped_loop(pace=0.01)
    try:
        doomed = loop.submit("count", 10_000, items=1, longest=1, timeout=0.3)
        mate = loop.submit("count", 60, items=1, longest=1, timeout=30)
        with pytest.raises(TaskTimeout, match=r"ran past its limit of 0.3 s and was stopped after \d+ steps"):
            doomed.result(timeout=5)
        assert mate.result(timeout=10) == 60
        assert ("stop", (10_000,)) in log
        assert loop.counts["count:stopped"] == 1
        assert all(10_000 not in rows for what, rows in log[log.index(("stop", (10_000,))):] if what == "step")
    finally:
        loop.stop()


def test_a_request_that_breaks_a_step_fails_alone_and_its_mates_start_again() -> None:
    loop, log = stepped_loop(pace=0.0)
    try:
        blocker = loop.submit("count", 30, items=1, longest=1, timeout=30)
        wait_started(log, 30)
        futures = {n: loop.submit("count", n, items=1, longest=1, timeout=30) for n in (4, 5, -1, 6, 7)}
        assert blocker.result(timeout=5) == 30
        for n, future in futures.items():
            if n == -1:
                with pytest.raises(ValueError, match="-1 breaks the step"):
                    future.result(timeout=5)
            else:
                assert future.result(timeout=5) == n
    finally:
        loop.stop()


def peak_batches(log: list[tuple[str, tuple[int, ...]]]) -> int:
    under_way = peak = 0
    for what, _ in log:
        under_way += {"start": 1, "end": -1}.get(what, 0)
        peak = max(peak, under_way)
    return peak


def test_with_joins_a_new_request_joins_the_running_batch_after_its_first_step() -> None:
    loop, log = stepped_loop(joins=True, max_items=3)
    try:
        long = loop.submit("count", 80, items=1, longest=1, timeout=30)
        wait_started(log, 80)
        short = [loop.submit("count", n, items=1, longest=1, timeout=30) for n in (5, 6)]
        assert [f.result(timeout=5) for f in short] == [5, 6] and not long.done()
        steps = [rows for what, rows in log if what == "step"]
        assert (80, 5, 6) in steps or (80, 5) in steps  # one pass served the long row and the joined ones
        assert loop.counts["count:joined"] >= 1
        # full (3 rows): a fourth request gets a batch of its own beside it, up to max_running
        more = [loop.submit("count", 40, items=1, longest=1, timeout=30) for _ in range(3)]
        assert [f.result(timeout=10) for f in more] == [40, 40, 40]
        assert long.result(timeout=10) == 80
        steps = [rows for what, rows in log if what == "step"]
        assert max(len(rows) for rows in steps) == 3  # joined up to max_items, never beyond
        assert peak_batches(log) <= 2
    finally:
        loop.stop()


def test_a_request_that_cannot_join_holds_no_other_kind_behind_it() -> None:
    loop, log = stepped_loop(max_running=1, joins=True, max_items=4, max_tokens=100)
    try:
        long = loop.submit("count", 300, items=1, longest=60, timeout=30)
        wait_started(log, 300)
        waiting = loop.submit("count", 5, items=1, longest=60, timeout=30)  # 2 x 60 tokens > 100: it waits
        time.sleep(0.1)
        assert loop.submit("square", 9, items=1, longest=1, timeout=30).result(timeout=2) == 81
        assert not long.done() and not waiting.done()
        assert waiting.result(timeout=10) == 5 and long.result(timeout=10) == 300
    finally:
        loop.stop()


@pytest.mark.parametrize("refuse", ["none", "raise"])
def test_a_refused_join_runs_beside_and_the_loop_lives_on(refuse: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Countdown, "refuse", refuse)
    loop, log = stepped_loop(max_running=1, joins=True)
    try:
        long = loop.submit("count", 100, items=1, longest=1, timeout=30)
        wait_started(log, 100)
        first = loop.submit("count", 5, items=1, longest=1, timeout=30)
        assert first.result(timeout=5) == 5  # beside the long one, once
        more = [loop.submit("count", 3, items=1, longest=1, timeout=30) for _ in range(3)]
        assert [f.result(timeout=10) for f in more] == [3, 3, 3] and long.result(timeout=10) == 100
        assert not loop.died
        assert loop.counts.get("count:joined", 0) == 0
        if refuse == "none":  # the key's batches no longer try: never more than max_running + the one refused
            assert peak_batches(log) == 2
    finally:
        loop.stop()


def test_a_new_batch_runs_its_prefill_beside_the_running_one_and_joins_after_it() -> None:
    loop, log = stepped_loop(joins=True, prefill_steps=3)
    try:
        long = loop.submit("count", 60, items=1, longest=1, timeout=30)
        wait_started(log, 60, what="step")  # its own prefill done: decoding
        short = loop.submit("count", 5, items=1, longest=1, timeout=30)
        assert short.result(timeout=5) == 5 and long.result(timeout=10) == 60
        prefills = [index for index, (what, rows) in enumerate(log) if what == "prefill" and rows == (5,)]
        assert len(prefills) == 3
        # the long row went on decoding between the new batch's prefill chunks
        assert any(log[index + 1] == ("step", (60,)) for index in prefills[:-1]), log
        assert ("step", (60, 5)) in log and loop.counts["count:joined"] == 1
    finally:
        loop.stop()


def test_stepped_batches_wait_for_room_in_the_cache_budget() -> None:
    # 2 bytes a token, 400 bytes: 200 tokens; each request reserves its longest (60) tokens
    loop, log = stepped_loop(max_running=4, cache_budget=400)
    try:
        first = [loop.submit("count", 30, items=1, longest=60, timeout=30) for _ in range(3)]
        time.sleep(0.05)
        late = loop.submit("count", 5, items=1, longest=60, timeout=30)  # a fourth: 4 x 60 > 200, it waits
        assert [f.result(timeout=10) for f in first] == [30, 30, 30]
        assert late.result(timeout=10) == 5
        first_end = min(index for index, (what, _) in enumerate(log) if what == "end")
        assert log.index(("start", (5,))) > first_end, "it started before there was room"
        assert loop.stats()["cache_mb"]["reserved"] == 0
        # one request alone over the whole budget still runs when nothing else does
        assert loop.submit("count", 2, items=1, longest=500, timeout=30).result(timeout=5) == 2
    finally:
        loop.stop()


def test_while_a_batch_is_on_its_way_in_no_further_one_starts_past_max_running() -> None:
    loop, log = stepped_loop(max_running=1, joins=True, max_items=2, prefill_steps=3)
    try:
        long = loop.submit("count", 40, items=1, longest=1, timeout=30)
        wait_started(log, 40)
        shorts = [loop.submit("count", 4, items=1, longest=1, timeout=30) for _ in range(4)]
        assert [f.result(timeout=10) for f in shorts] == [4, 4, 4, 4] and long.result(timeout=10) == 40
        # the running one, and one new batch in its prefill on its way in: never more
        assert peak_batches(log) <= 2, log
    finally:
        loop.stop()


def test_a_cancelled_row_frees_its_slot_for_a_waiting_request() -> None:
    loop, log = stepped_loop(max_running=1, joins=True, max_items=1)
    try:
        running = loop.submit("count", 10_000, items=1, longest=1, timeout=30)
        wait_started(log, 10_000)
        waiting = loop.submit("count", 3, items=1, longest=1, timeout=30)  # no room: one row, one batch
        time.sleep(0.1)
        assert ("start", (3,)) not in log
        loop.cancel(running)
        assert waiting.result(timeout=5) == 3  # it took the slot the cancelled row left
        with pytest.raises(Cancelled, match="cancelled by its caller after"):
            running.result(timeout=5)
        assert loop.counts["count:cancelled"] == 1
    finally:
        loop.stop()


def test_a_cancelled_request_still_waiting_for_cache_room_stops_holding_back_those_behind_it() -> None:
    """Cancelled while it waited, a request too large for the room left stayed first in its queue, and the
    small ones behind it, which fit, waited until its deadline."""
    loop, log = stepped_loop(max_running=4, cache_budget=400)  # 200 tokens
    try:
        long = loop.submit("count", 10_000, items=1, longest=100, timeout=30)
        wait_started(log, 10_000)
        too_large = loop.submit("count", 5, items=1, longest=150, timeout=30)  # 100 + 150 > 200: it waits
        time.sleep(0.05)
        loop.cancel(too_large)
        assert loop.submit("count", 3, items=1, longest=50, timeout=30).result(timeout=5) == 3
        assert too_large.cancelled() and loop.counts["count:cancelled_waiting"] == 1
        assert ("start", (5,)) not in log
        loop.cancel(long)
    finally:
        loop.stop()


def test_a_row_that_fails_to_leave_is_answered_and_its_mate_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    loop, log = stepped_loop(pace=0.01)
    try:
        doomed = loop.submit("count", 10_000, items=1, longest=1, timeout=30)
        mate = loop.submit("count", 40, items=1, longest=1, timeout=30)
        wait_started(log, 10_000, 40, what="step")
        monkeypatch.setattr(Countdown, "stop_fails", True)
        loop.cancel(doomed)
        with pytest.raises(Cancelled, match="cancelled by its caller"):
            doomed.result(timeout=5)
        monkeypatch.setattr(Countdown, "stop_fails", False)
        assert mate.result(timeout=10) == 40  # the lone mate started again; it did not fail for the other
        assert ("start", (40,)) in log
    finally:
        loop.stop()


def test_a_row_started_again_after_a_failed_step_tells_its_listener_to_start_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed row told of its tokens before a failed step is told None (void) before its new run's tokens."""
    loop, log = stepped_loop(pace=0.01)
    told: dict[int, list[list[int] | None]] = {20: [], 21: []}
    try:
        futures = {n: loop.submit("count", n, items=1, longest=1, timeout=30, progress=told[n].append)
                   for n in (20, 21)}
        wait_started(log, 20, 21)
        deadline = time.monotonic() + 5
        while len(told[20]) < 3:
            assert time.monotonic() < deadline, told
            time.sleep(0.005)
        monkeypatch.setattr(Countdown, "fail_next_step", True)
        for n, future in futures.items():
            assert future.result(timeout=10) == n
            restart = told[n].index(None)
            before, after = told[n][:restart], told[n][restart + 1:]
            assert before and all(piece is not None for piece in after)
            assert sum(len(piece) for piece in after if piece is not None) == n - 1, told[n]  # from scratch
    finally:
        loop.stop()


def test_an_older_request_waiting_for_cache_room_is_not_overtaken_by_another_models_newer_ones() -> None:
    """Two stepped kinds share one device's cache budget: room that frees goes to the oldest request waiting
    for it, whatever its model. Newer requests of the other model kept taking it, and the older one waited
    until its deadline."""
    log: list[tuple[str, tuple[int, ...]]] = []
    kinds: dict[str, Any] = {key: SteppedKind(lambda payloads: Countdown(payloads, log, 0.005),
                                              BatchLimits(8, 10_000, 0.0), 4, False, cache_bytes_per_token=1)
                             for key in ("a", "b")}
    kinds["square"] = BatchKind(lambda payloads: [p * p for p in payloads], BatchLimits(8, 10_000, 0.0))
    loop = DeviceLoop(kinds, cache_budget=10)
    loop.start()
    stop = threading.Event()

    def feed_b() -> None:  # a request of b every 15 ms, each 6 steps long and reserving 4 of the 10
        while not stop.is_set():
            loop.submit("b", 6, items=1, longest=4, timeout=30)
            time.sleep(0.015)

    feeder = threading.Thread(target=feed_b)
    feeder.start()
    try:
        time.sleep(0.1)
        big = loop.submit("a", 3, items=1, longest=8, timeout=3)  # 8 of the 10: it fits once b's rows leave
        squares = [loop.submit("square", n, items=1, longest=1, timeout=3) for n in range(5)]  # no cache: no wait
        assert [square.result(timeout=5) for square in squares] == [n * n for n in range(5)]
        assert big.result(timeout=5) == 3
        assert not loop.died
    finally:
        stop.set()
        feeder.join()
        loop.stop()


def test_room_kept_for_a_bulk_request_waiting_for_it_is_not_kept_from_an_interactive_one_of_another_model() -> None:
    """Across models, the most urgent lane goes first: an older bulk request of one model that did not fit held
    a newer interactive request of another, which did, until room for the bulk one freed."""
    log: list[tuple[str, tuple[int, ...]]] = []
    kinds: dict[str, Any] = {key: SteppedKind(lambda payloads: Countdown(payloads, log, 0.005),
                                              BatchLimits(8, 10_000, 0.0), 4, False, cache_bytes_per_token=1)
                             for key in ("a", "b")}
    loop = DeviceLoop(kinds, cache_budget=10)
    loop.start()
    try:
        long = loop.submit("b", 10_000, items=1, longest=4, timeout=30)  # 4 of the 10, for a long while
        wait_started(log, 10_000)
        bulk = loop.submit("a", 3, items=1, longest=8, timeout=30, priority=9)  # 4 + 8 > 10: it waits
        time.sleep(0.05)
        assert loop.submit("b", 2, items=1, longest=4, timeout=30).result(timeout=5) == 2  # 4 + 4 fits
        assert not bulk.done()
        loop.cancel(long)
        assert bulk.result(timeout=5) == 3  # and the bulk one runs once room frees
    finally:
        loop.stop()


def test_a_device_error_stops_the_loop_unanswered_rather_than_failing_every_request_after_it() -> None:
    """CUDA keeps failing every call after an illegal memory access: split and retried, each request failed
    at once, and a worker failing fast took most of its queue. The loop stops without answering (the stall
    watch then ends the process, and the unacknowledged messages go to another worker)."""
    calls: list[list[int]] = []

    def broken(payloads: list[int]) -> list[int]:
        calls.append(payloads)
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    loop = DeviceLoop({"embed": BatchKind(broken, BatchLimits(8, 10_000, 0.05))})
    loop.start()
    futures = [loop.submit("embed", n, items=1, longest=1, timeout=30) for n in range(4)]
    deadline = time.monotonic() + 5
    while not loop.died:
        assert time.monotonic() < deadline, "the loop went on after the device failed"
        time.sleep(0.01)
    assert calls == [[0, 1, 2, 3]]  # not split and retried
    assert not any(future.done() for future in futures)
    assert isinstance(loop.broken, torch.AcceleratorError)
    # while stopping too (draining at shutdown): the watch must still see it died, or those wait for ever
    draining = DeviceLoop({"embed": BatchKind(broken, BatchLimits(8, 10_000, 10.0))})
    draining.start()
    draining.submit("embed", 0, items=1, longest=1, timeout=30)  # waits for batch-mates; stop runs it
    draining.stop()
    assert draining.died and draining.broken is not None
