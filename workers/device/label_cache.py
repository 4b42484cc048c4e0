"""Zero-shot label vectors, kept per (embedding model, label text) across requests.

A web app classifies against the same few label sets again and again: a label whose vector is kept costs
nothing on the device, and only labels not seen before ride in the batch beside the texts. The cache is
bounded, and a label set in use stays: the least recently used entry goes first once it is full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch


class LabelVectors:
    def __init__(self, size: int) -> None:
        self._size = size
        self._vectors: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # task threads look up; the threads that build results keep

    def __len__(self) -> int:
        return len(self._vectors)

    def lookup(self, alias: str, texts: Sequence[str]) -> dict[str, torch.Tensor | None]:
        """Each label text's vector, or None where there is none yet."""
        found: dict[str, torch.Tensor | None] = {}
        with self._lock:
            for text in texts:
                vector = found[text] = self._vectors.get((alias, text))
                if vector is not None:
                    self._vectors.move_to_end((alias, text))
        return found

    def keep(self, alias: str, texts: Sequence[str], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keep the vectors computed for these label texts (one row each); returns them as kept."""
        # a copy: a row is a view that would keep its whole batch's (or reply's) rows alive
        kept = {text: row.clone() for text, row in zip(texts, rows, strict=True)}
        with self._lock:
            for text, vector in kept.items():
                self._vectors[(alias, text)] = vector
                self._vectors.move_to_end((alias, text))
            while len(self._vectors) > self._size:
                self._vectors.popitem(last=False)
        return kept
