"""The zero-shot label cache: bounded, and a label set in use is the last to go."""

from __future__ import annotations

import torch

from workers.device.label_cache import LabelVectors


def test_the_least_recently_used_label_goes_first_and_kept_rows_are_copies() -> None:
    cache = LabelVectors(size=3)
    batch = torch.arange(12.0).reshape(4, 3)  # a batch's rows: texts first, then the labels computed with them
    kept = cache.keep("minilm", ["a", "b", "c"], batch[1:])
    # each holds its own row only, not a view keeping the whole batch alive
    assert all(vector.untyped_storage().nbytes() == 3 * 4 for vector in kept.values())
    assert torch.equal(kept["b"], batch[2])
    assert cache.lookup("minilm", ["a", "x"]) == {"a": kept["a"], "x": None}  # "a" used again: now the newest
    assert cache.lookup("other-model", ["a"]) == {"a": None}  # per embedding model
    cache.keep("minilm", ["d"], torch.zeros(1, 3))  # over the size: "b", the least recently used, goes
    found = cache.lookup("minilm", ["a", "b", "c", "d"])
    assert [text for text, vector in found.items() if vector is None] == ["b"] and len(cache) == 3
