"""The dead-letter list: messages inferq gave up on, kept in Redis for inspection with the reason.

``LRANGE inferq:dead-letter 0 -1`` lists them, newest first; each entry is a JSON object with ``reason``,
``queue``, ``task_id`` (when known), ``at`` (Unix time) and ``raw`` (the message as received, cut to 64 KiB).
The list keeps the newest 10,000 entries.
"""

from __future__ import annotations

import json
import time
from typing import Any

DEAD_LETTER_KEY = "inferq:dead-letter"
KEEP = 10_000
RAW_LIMIT = 64 * 1024


def entry(reason: str, queue: str | None, raw: bytes | str, task_id: str | None = None) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return json.dumps({"reason": reason, "queue": queue, "task_id": task_id, "at": time.time(),
                       "raw": text[:RAW_LIMIT]})


def record(client: Any, reason: str, queue: str | None, raw: bytes | str, task_id: str | None = None) -> None:
    """LPUSH one entry (``client``: a redis-py client on the broker) and trim the list."""
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(DEAD_LETTER_KEY, entry(reason, queue, raw, task_id))
        pipe.ltrim(DEAD_LETTER_KEY, 0, KEEP - 1)
        pipe.execute()
