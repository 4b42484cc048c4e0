"""JSON in the worker, decoded and (for task events) encoded with orjson, with Kombu's JSON as the fallback.

Kombu decodes every JSON message with the standard library and an ``object_hook`` it calls on every object,
and encodes with a ``JSONEncoder`` subclass, which takes the pure-Python encoder path: a task message's
envelope and body took 17 us to decode, against 5 us with orjson, and every task event is encoded once more
on its way to Flower. The results are the same JSON values either way; where they could differ, Kombu's own
functions still run:

- Decoding: orjson first. Text that carries Kombu's typed values (``{"__type__": ..., "__value__": ...}``:
  datetimes, UUIDs, bytes, decimals), a run of 19 or more digits (orjson reads an integer beyond 64 bits
  as a float, where Kombu keeps it exact), or that orjson refuses (``NaN``, invalid UTF-8) goes to
  Kombu's decoder, which accepts or refuses it exactly as before.
- Encoding (task events only, the ``inferq-json`` serializer): orjson for plain values; any object that
  holds a type orjson would encode differently from Kombu (datetime, dataclass, UUID, a subclass of a
  built-in type) or cannot encode is encoded by Kombu's encoder instead.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from kombu.serialization import registry
from kombu.utils import json as kombu_json

SERIALIZER = "inferq-json"
CONTENT_TYPE = "application/json"
_TYPED_MARKER = b'"__type__"'
_LONG_DIGITS = re.compile(rb"\d{19}")
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


class _NotPlain(TypeError):
    """A value orjson does not encode the way Kombu does: the whole object goes to Kombu's encoder."""


def orjson_reads_exactly(raw: bytes) -> bool:
    """Whether orjson gives the values the standard library would (or refuses): no typed values, no integer
    too long for 64 bits (a false alarm only costs the slower decoder)."""
    return _TYPED_MARKER not in raw and _LONG_DIGITS.search(raw) is None


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if orjson_reads_exactly(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # Kombu's decoder decides: it accepts NaN and big integers, and names the error otherwise
    return kombu_json.loads(data)


def _refuse(value: Any) -> Any:
    raise _NotPlain(type(value).__name__)


def dumps(value: Any) -> str:
    try:
        if _holds_uuid(value):  # orjson writes UUIDs as plain strings; Kombu keeps their type
            raise _NotPlain("UUID")
        return orjson.dumps(value, default=_refuse, option=_PASSTHROUGH).decode("utf-8")
    except (_NotPlain, TypeError):
        return str(kombu_json.dumps(value))


def _holds_uuid(value: Any) -> bool:
    if isinstance(value, uuid.UUID):
        return True
    if isinstance(value, dict):
        return any(_holds_uuid(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_uuid(item) for item in value)
    return False


def install() -> None:
    """Every JSON message this process receives decodes with ``loads``; ``inferq-json`` encodes with ``dumps``.
    The worker's own process only: producers keep Kombu's JSON."""
    registry.register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="utf-8")
    # register() maps the content type to the newest name; plain "json" must keep naming Kombu's encoder
    registry.type_to_name[CONTENT_TYPE] = "json"
