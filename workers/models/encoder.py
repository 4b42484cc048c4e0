"""What the encoder models share: tokenising under the token limit and running the forward in chunks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from producer.errors import InputTooLarge
from workers.models.loading import LoadedModel

# Texts per forward pass inside one request. Attention memory grows with count x length^2, so a request
# with many long texts runs as several passes, shortest texts together to keep padding small.
CHUNK = 32


def encode(loaded: LoadedModel, texts: list[str], what: str,
           head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the encoder over texts; ``head(last_hidden_state_or_logits, attention_mask)`` makes one row each.

    Raises InputTooLarge naming the first text over the model's token limit (unless it truncates).
    Returns float32 rows on the CPU, in input order.
    """
    entry = loaded.entry
    batch = loaded.tokenizer(texts, padding=False, truncation=entry.truncate, max_length=entry.max_length)
    ids: list[list[int]] = batch["input_ids"]
    for i, row in enumerate(ids):
        if len(row) > entry.max_length:
            raise InputTooLarge(
                f"{what}[{i}] is {len(row)} tokens; model {loaded.alias!r} accepts at most {entry.max_length} "
                "(shorten it, or set truncate = true for this model)"
            )
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rows: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(order), CHUNK):
        chunk = order[start:start + CHUNK]
        padded = loaded.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
        inputs = {key: value.to(loaded.device) for key, value in padded.items()}
        output = loaded.model(**inputs)
        mask = inputs["attention_mask"]
        values = output.logits if head is None else head(output.last_hidden_state, mask)
        values = values.float().cpu()
        for j, i in enumerate(chunk):
            rows[i] = values[j]
    return torch.stack([row for row in rows if row is not None])
