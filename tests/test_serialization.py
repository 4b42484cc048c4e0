"""The worker's JSON (orjson, with Kombu's as the fallback) reads and writes exactly what Kombu's does, and a
task event shows a result exactly as repr writes it."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any

import numpy as np
import pytest
from kombu.utils import json as kombu_json

from workers.receiving import events as events_module
from workers.receiving import serialization
from workers.receiving.result_repr import result_repr

PLAIN: list[Any] = [
    {"hostname": "gpu0@host", "clock": 12, "timestamp": 1796165414.777, "type": "task-succeeded",
     "result": "{'dim': 32, 'embeddings': [[0.15, ...]]}", "args": "()", "eta": None, "ok": True},
    [[], {"texts": ["ünïcödé ✓", "a\nb"]}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
    [{"uuid": "e3b0c442-98fc-1c14", "runtime": 0.5}, {"uuid": "x", "type": "task-started"}],
]


@pytest.mark.parametrize("value", PLAIN)
def test_plain_values_decode_as_kombu_does(value: Any) -> None:
    text = kombu_json.dumps(value)
    assert serialization.loads(text) == kombu_json.loads(text) == value
    assert serialization.loads(text.encode()) == value


def test_kombu_typed_values_keep_their_types() -> None:
    when = datetime.datetime(2026, 12, 1, 22, 44, 10, tzinfo=datetime.UTC)
    value = {"eta": when, "id": uuid.UUID(int=7), "amount": decimal.Decimal("1.50"), "raw": b"\x00\xff"}
    encoded = kombu_json.dumps(value)
    assert serialization.loads(encoded) == kombu_json.loads(encoded) == value


def test_what_orjson_refuses_is_decided_by_kombu() -> None:
    assert math.isnan(serialization.loads('{"x": NaN}')["x"])  # accepted as before
    assert serialization.loads('{"big": 123456789012345678901234567890}')["big"] == 123456789012345678901234567890
    with pytest.raises(ValueError, match="Expecting"):  # the standard library's error, naming the place
        serialization.loads('{"x": ')


def test_task_events_are_written_as_kombu_writes_them() -> None:
    events = [event for value in PLAIN for event in (value if isinstance(value, list) else [value])
              if isinstance(event, dict)]
    written = events_module.encode_events(events)
    assert kombu_json.loads(written) == kombu_json.loads(kombu_json.dumps(events)) == events


def test_task_events_orjson_cannot_write_exactly_are_written_by_kombu() -> None:
    when = datetime.datetime(2026, 12, 1, 22, 44, 10, tzinfo=datetime.UTC)
    for odd in ({"retries": 2**70}, {"eta": when}, {"amount": decimal.Decimal("1.50")}, {"raw": b"\x00"}):
        written = events_module.encode_events([odd])
        assert written.decode() == kombu_json.dumps([odd])
        assert kombu_json.loads(written) == [odd]


def test_only_strings_numbers_and_none_count_as_plain() -> None:
    assert events_module.plain("()", 0, 1.5, None, True)
    assert not events_module.plain(float("nan")) and not events_module.plain(float("-inf"))
    assert not events_module.plain(uuid.UUID(int=7))
    assert not events_module.plain(["a list"])


def _shown_by_repr(value: Any, depth: int = 4) -> Any:
    """What a task-succeeded event shows, by plain repr: lists cut to their first 16 items and "..."."""
    class More:
        def __repr__(self) -> str:
            return "..."

    if isinstance(value, list | tuple):
        if depth <= 0:
            return [More()] if value else value
        kept = [_shown_by_repr(item, depth - 1) for item in value[:16]]
        return [*kept, More()] if len(value) > 16 else kept
    if isinstance(value, dict):
        return {key: _shown_by_repr(item, depth - 1) for key, item in value.items()}
    return value


@pytest.mark.parametrize("scale", [1e-9, 1e-5, 1e-4, 1.0, 1e3, 1e15, 1e16, 1e300])
def test_an_event_shows_a_result_as_repr_writes_it(scale: float) -> None:
    random = np.random.default_rng(7)
    for rows, dim in ((1, 384), (2, 5), (0, 0), (3, 16), (1, 17)):
        with np.errstate(over="ignore"):  # 1e300 is inf in float32: repr writes inf, orjson would write null
            vectors = (random.standard_normal((rows, dim)) * scale).astype(np.float32).tolist()
        for result in ({"model": "m", "dim": dim, "embeddings": vectors, "prompt_tokens": 3}, vectors,
                       {"labels": ["a", "b"], "scores": [0.25, 1e-7, float("nan"), -0.0, float("inf")]}):
            assert result_repr(result) == repr(_shown_by_repr(result))[:1024]
