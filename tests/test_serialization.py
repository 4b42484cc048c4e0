"""The worker's JSON decoder (orjson, with Kombu's as the fallback) reads exactly the values Kombu's does."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any

import pytest
from kombu.utils import json as kombu_json

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
