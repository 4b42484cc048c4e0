"""What a message must be before Kombu and Celery read it: an envelope Kombu can make a message of, and a
body Celery can call a task with.

Anyone who can LPUSH to a queue can put anything there, and Kombu reads what it pops inside the worker's event
loop: what it cannot read stops the worker, and a message the take recorded as unacknowledged would come back
after the visibility timeout to stop the next one. The transport dead-letters an entry ``envelope_problem``
refuses. A body of the wrong shape Celery acknowledges unanswered, or fails in its pool where nothing is
stored nor acknowledged; the consumer refuses one ``triple_problem`` names, whichever path would run it.
"""

from __future__ import annotations

import base64
from typing import Any

from producer.contract import json_type_name

MAX_TASK_ID = 255  # a UUID is 36; a client's own ids are kept short enough for a Redis key and a log line
MAX_DEPTH = 32  # a message's headers and properties nest 3 levels at most; Celery's own, 4


def nesting_problem(payload: dict[str, Any]) -> str | None:
    """Why an envelope's headers or properties nest too deep; None when they do not. Kombu's JSON (the
    visibility sweep's restore, the events' buffer) recurses, and fails past about 1,000 levels, which orjson
    reads: a record that deep raised in every sweep, and no message came back from a dead worker any more.
    The transport asks only of an entry with more than MAX_DEPTH brackets (4 us an envelope otherwise)."""
    if nested_deeper(payload.get("headers"), MAX_DEPTH) or nested_deeper(payload.get("properties"), MAX_DEPTH):
        return f"the envelope's headers or properties nest deeper than {MAX_DEPTH} levels"
    return None


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests lists and objects more than ``limit`` levels deep (iteratively)."""
    level: list[Any] = [value]
    depth = 0
    while True:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [item for node in containers for item in (node.values() if isinstance(node, dict) else node)]


def usable_task_id(task_id: Any) -> bool:
    if not isinstance(task_id, str) or not 1 <= len(task_id) <= MAX_TASK_ID:
        return False
    try:
        task_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def envelope_problem(payload: Any) -> str | None:
    """Why a decoded list entry cannot be delivered as a message; None when it can. Everything Kombu reads to
    build its message is checked here: what it cannot read there raises in the consumer and stops the worker,
    and the message, recorded as unacknowledged, would come back to stop the next one."""
    if not isinstance(payload, dict):
        return f"the entry is JSON {json_type_name(payload)}, not a message envelope object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no 'properties' object"
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict):
        return f"the envelope's 'headers' is JSON {json_type_name(payload['headers'])}, not an object"
    task_id = headers.get("id")
    if task_id is not None and not usable_task_id(task_id):
        # Its result key could not be written (a lone surrogate raises as the key is encoded), which failed the
        # store of every result of the batch it was answered in.
        return f"the envelope's headers.id is not a task id (a string of 1 to {MAX_TASK_ID} UTF-8 characters)"
    for field in ("content-type", "content-encoding"):
        if not isinstance(payload.get(field) or "", str):
            return f"the envelope's {field!r} is not a string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not isinstance(info.get("exchange"), str) \
            or not isinstance(info.get("routing_key"), str):
        return "the envelope's properties.delivery_info lacks 'exchange' or 'routing_key'"
    if not isinstance(properties.get("delivery_tag"), str):
        return "the envelope's properties lack a string 'delivery_tag'"
    body = payload.get("body")
    if not isinstance(body, str):
        return "the envelope has no string 'body'"
    encoding = properties.get("body_encoding")
    if not encoding or (isinstance(encoding, str) and encoding.lower() == "utf-8"):  # as Kombu skips decoding
        return None
    if encoding != "base64":  # the only codec Kombu's channels know
        return f"the envelope's properties.body_encoding {str(encoding)[:40]!r} is not base64 or utf-8"
    try:
        base64.b64decode(body.encode())  # as Kombu will decode it (0.6 us for a task's body)
    except ValueError as exc:  # UnicodeEncodeError (a lone surrogate) too, where Kombu would raise it
        return f"the envelope's body is not base64 ({exc})"
    return None


def triple_problem(body: Any) -> str | None:
    """Why a decoded body is not one Celery can call a task with; None when it is. A protocol-2 body is an
    ``[args, kwargs, embed]`` triple; an object with "args" is a protocol-1 body, which Celery converts (any
    other object it would unpack as a triple of its keys, and fail in the pool, where nothing is answered)."""
    if isinstance(body, dict):
        if "args" not in body:
            return "the body is a JSON object without 'args'"
        args, kwargs, embed = body["args"], body.get("kwargs") or {}, None
    elif not isinstance(body, list | tuple) or len(body) != 3:
        return f"the body is JSON {json_type_name(body)}" + (f" of {len(body)}" if isinstance(body, list) else "")
    else:
        args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return f"its args are JSON {json_type_name(args)}, not a list"
    if not isinstance(kwargs, dict):
        return f"its kwargs are JSON {json_type_name(kwargs)}, not an object"
    if embed is not None and not isinstance(embed, dict):
        return f"its embed is JSON {json_type_name(embed)}, not an object or null"
    return None
