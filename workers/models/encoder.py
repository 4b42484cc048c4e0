"""What the encoder models share: tokenising under the token limit, and length-sorted forward passes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from producer.errors import InputTooLarge
from workers.device.batching import plan_chunks
from workers.models.loading import LoadedModel

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tokenize(loaded: LoadedModel, texts: list[str], what: str) -> list[list[int]]:
    """Token ids per text. Thread-safe. Raises InputTooLarge naming the first text over the limit."""
    ids = [encoding.ids for encoding in loaded.encoder.encode_batch(texts)]
    limit = loaded.entry.max_length
    for i, row in enumerate(ids):
        if len(row) > limit:
            raise InputTooLarge(f"{what}[{i}] is {len(row)} tokens; model {loaded.alias!r} accepts at most {limit} "
                                "(shorten it, or set truncate = true for this model)")
    return ids


def pad(rows: list[list[int]], pad_id: int, device: torch.device,
        left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, padded on the right (encoders) or the left (decoders)."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return input_ids.to(device), mask.to(device)


def forward(loaded: LoadedModel, ids: list[list[int]], head: Head | None, max_items: int,
            max_tokens: int) -> torch.Tensor:
    """Run the encoder over every input, in length-sorted passes within the budget.

    ``head(last_hidden_state, attention_mask)`` makes one row per input (None: the model's logits).
    Returns float32 rows on the CPU, in input order; exactly one per input, or it raises.
    """
    pad_id = loaded.tokenizer.pad_token_id or 0
    rows: list[torch.Tensor | None] = [None] * len(ids)
    for chunk in plan_chunks([len(row) for row in ids], max_items, max_tokens):
        input_ids, mask = pad([ids[i] for i in chunk], pad_id, loaded.device)
        output = loaded.model(input_ids=input_ids, attention_mask=mask)
        values = output.logits if head is None else head(output.last_hidden_state, mask)
        values = values.float().cpu()
        for j, i in enumerate(chunk):
            rows[i] = values[j]
    done = [row for row in rows if row is not None]
    if len(done) != len(ids):
        raise RuntimeError(f"encoder produced {len(done)} rows for {len(ids)} inputs")
    return torch.stack(done)
