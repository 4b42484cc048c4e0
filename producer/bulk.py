"""Bulk jobs from JSONL: one task per input line, results written in input order, with a progress bar.

Each input line is a JSON string (one text, or one prompt) or a JSON object of the task's kwargs.
Each output line is ``{"line": n, "result": ...}`` or ``{"line": n, "error": {"type": ..., "message": ...}}``.
Blank lines are skipped; line numbers count every physical line from 1.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from producer.client import Client, Handle
from producer.contract import Lane, json_type_name
from producer.errors import InferqConnectionError, InferqError, InvalidInput
from producer.settings import Kind


@dataclass
class BulkReport:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def line_kwargs(kind: Kind, raw: str, defaults: dict[str, Any],
                chat: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The task kwargs one input line stands for; CLI options are defaults that the line may override. With
    ``chat`` (the messages before it, a system message or none), a generate line that is a string is sent as
    the user's message of a chat, not as a raw prompt."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:  # read with surrogateescape: each undecodable byte is a lone surrogate
        raise InvalidInput(f"not valid UTF-8 (byte 0x{ord(raw[exc.start]) - 0xDC00:02x} at column {exc.start + 1}); "
                           "each line must be UTF-8 text") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be a JSON "
                           "string or a JSON object of kwargs") from None
    if isinstance(value, str):
        if kind != "generate":
            return {**defaults, "texts": [value]}
        if chat is not None:
            return {**defaults, "messages": [*chat, {"role": "user", "content": value}]}
        return {**defaults, "prompt": value}
    if isinstance(value, dict):
        if "priority" in value:  # the lane is the run's (--priority), not a task argument
            raise InvalidInput("'priority' is not a task argument; the whole file's lane is set with --priority")
        return {**defaults, **value}
    raise InvalidInput(f"a JSON {json_type_name(value)} is not a job; each line must be a JSON string or a "
                       "JSON object of kwargs")


def run_bulk(client: Client, kind: Kind, lines: Iterable[str], out: TextIO, *,
             defaults: dict[str, Any] | None = None, window: int = 256, total: int | None = None,
             progress: bool = True, priority: Lane = "bulk", chat: list[dict[str, str]] | None = None) -> BulkReport:
    """Send every line, keeping at most ``window`` tasks in flight, and write results in input order; in the
    bulk lane by default, so a file never makes interactive callers of the same workers wait. Each line's
    result timeout counts from its send: counted from its turn to be written, lines that get no answer (no
    worker) would time out one after another, a file of N lines taking N timeouts to fail."""
    report = BulkReport()
    pending: deque[tuple[int, Handle[Any] | InferqError, float]] = deque()
    bar = tqdm(total=total, unit="job", disable=not progress, dynamic_ncols=True)
    timeout = client.settings.result_timeout

    def emit() -> None:
        number, outcome, deadline = pending.popleft()
        record: dict[str, Any] = {"line": number}
        try:
            if isinstance(outcome, InferqError):
                raise outcome
            record["result"] = outcome.get(timeout=max(deadline - time.monotonic(), 0.0))
            report.ok += 1
        except Exception as exc:  # every failure becomes an output line; the run goes on
            name = type(exc).__name__
            record["error"] = {"type": name, "message": str(exc)}
            report.failed += 1
            report.errors[name] = report.errors.get(name, 0) + 1
        out.write(json.dumps(record) + "\n")
        bar.update(1)

    try:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                handle = client.submit(kind, priority=priority, **line_kwargs(kind, raw, defaults or {}, chat))
                pending.append((number, handle, time.monotonic() + timeout))
            except InferqConnectionError as exc:  # no point going on: every other line would fail the same way
                pending.append((number, exc, 0.0))
                while pending:  # but every line sent so far, and this one, is reported first
                    emit()
                raise
            except InferqError as exc:  # rejected before sending: same output shape as a worker's error
                pending.append((number, exc, 0.0))
            while len(pending) >= window:
                emit()
        while pending:
            emit()
    finally:
        bar.close()
        out.flush()
    return report
