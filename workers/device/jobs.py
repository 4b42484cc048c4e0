"""What the device loop holds for one request, and how the request is answered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from producer.errors import Cancelled, TaskTimeout
from workers.device.metrics import outcome_label

# runs one batch of payloads; returns one result (or exception) per payload, in order
Runner = Callable[[list[Any]], Sequence[Any]]
# told what a stepped request produced in each step; None: it starts again from scratch (its batch failed a
# step and runs again), so what it was told before is void
Progress = Callable[[list[Any] | None], None]


@dataclass(slots=True)
class Job:
    payload: Any
    future: Future[Any]
    timeout: float
    deadline: float
    longest: int  # tokens of its longest input (for a generate request, prompt + max_new_tokens)
    progress: Progress | None = None  # told what a stepped request produced, step by step
    reported: int = 0  # how much of what it produced progress was told of


def ran_late(job: Job, steps: int | None) -> TaskTimeout:
    return TaskTimeout(f"the request ran past its limit of {job.timeout:g} s and was stopped{_after(steps)}")


def was_cancelled(job: Job, steps: int | None) -> Cancelled:
    return Cancelled(f"the request was cancelled by its caller{_after(steps)}")


def _after(steps: int | None) -> str:
    return "" if steps is None else f" after {steps} steps"


class LeavingFailed(Exception):
    """Taking a stopped row out of its batch failed (out of memory selecting the other rows' cache, say)."""


def answer(job: Job, outcome: Any) -> str:
    """Answers the job; its outcome's label for the metrics."""
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
        return outcome_label(outcome)
    job.future.set_result(outcome)
    return "ok"
