"""The worker's JSON decoder (orjson, with Kombu's as the fallback) reads exactly the values Kombu's does."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from workers.receiving import events as events_module
from workers.receiving import serialization

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
    assert not events_module.plain(uuid.UUID(int=7))
    assert not events_module.plain(["a list"])
