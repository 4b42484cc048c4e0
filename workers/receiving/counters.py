"""A counter that task threads and the consumer thread raise together, read by `inferq_status`."""

from __future__ import annotations

import threading
from collections import Counter


class SharedCounter:
    def __init__(self, *names: str) -> None:
        self._counts: Counter[str] = Counter({name: 0 for name in names})  # named ones show up as 0
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
