"""Batched decoding where every row keeps its own settings, as if it ran alone.

One forward pass per step serves every row; each row then picks its token with its own temperature,
top_p and random generator, so a seeded request samples the same text whether it shares the batch or
not, and a greedy row is never touched by a sampled one. Prompts are left-padded; positions count only
real tokens. A row stops at an end-of-sequence token, at its own max_new_tokens, or once its text
contains one of its stop strings; the loop ends when every row has stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.models.encoder import pad as pad_rows


@dataclass
class Row:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop: tuple[str, ...] = ()
    completion: list[int] = field(default_factory=list)
    ended_by_eos: bool = False
    ended_by_stop: bool = False

    @property
    def done(self) -> bool:
        return self.ended_by_eos or self.ended_by_stop or len(self.completion) >= self.max_new_tokens


def pick(logits: torch.Tensor, row: Row) -> int:
    """The next token of one row from its float32 logits over the vocabulary."""
    if row.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=row.generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def decode(model: Any, rows: list[Row], eos: set[int], pad: int, device: torch.device,
           text_of: Callable[[list[int]], str]) -> None:
    """Fill each row's completion in place."""
    input_ids, mask = pad_rows([row.prompt for row in rows], pad, device, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    step_inputs, step_positions = input_ids, positions
    while True:
        output = model(input_ids=step_inputs, attention_mask=mask, position_ids=step_positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        logits = output.logits[:, -1, :].float()
        greedy = logits.argmax(dim=-1).tolist()  # one vectorised pass for every greedy row
        next_tokens: list[int] = []
        for i, row in enumerate(rows):
            if row.done:
                next_tokens.append(pad)
                continue
            token = greedy[i] if row.temperature <= 0 else pick(logits[i], row)
            row.completion.append(token)
            if token in eos:
                row.ended_by_eos = True
            elif row.stop:
                text = text_of(row.completion)
                row.ended_by_stop = any(stop in text for stop in row.stop)
            next_tokens.append(token)
        if all(row.done for row in rows):
            return
        step_inputs = torch.tensor(next_tokens, device=device).unsqueeze(-1)
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=-1)
