"""The dead-letter list: messages inferq gave up on, kept in Redis for inspection with the reason.

``LRANGE inferq:dead-letter 0 -1`` lists them, newest first; each entry is a JSON object with ``reason``,
``queue``, ``task_id`` (when known), ``at`` (Unix time) and ``raw`` (the message as received, cut to 64 KiB of UTF-8).
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
    # Cut in UTF-8 bytes and written without \u escapes: cut in characters and escaped, an entry of emoji or
    # of bytes that are not UTF-8 took 12 times the limit (768 KiB), and the list 10,000 of them.
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    cut = text.encode("utf-8", errors="replace")[:RAW_LIMIT].decode("utf-8", errors="ignore")  # ignore: a
    # character cut in two at the end
    return json.dumps({"reason": reason, "queue": queue, "task_id": task_id, "at": time.time(), "raw": cut},
                      ensure_ascii=False)


def record(client: Any, reason: str, queue: str | None, raw: bytes | str, task_id: str | None = None) -> None:
    """LPUSH one entry (``client``: a redis-py client on the broker) and trim the list."""
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(DEAD_LETTER_KEY, entry(reason, queue, raw, task_id))
        pipe.ltrim(DEAD_LETTER_KEY, 0, KEEP - 1)
        pipe.execute()
