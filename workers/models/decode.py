"""Batched decoding a step at a time, where every row keeps its own settings, as if it ran alone.

One forward pass per step serves every live row; each row then picks its token with its own temperature,
top_p and random generator, so a seeded request samples the same text whether it shares the batch or
not, and a greedy row is never touched by a sampled one. Prompts are left-padded; positions count only
real tokens. A row stops at an end-of-sequence token, at its own max_new_tokens, or once its text
contains one of its stop strings, and leaves the batch at once: its caller gets its answer then, not when
the longest row is done, and the rows left compute no more for it. A row can also be stopped from outside
between steps (its caller gave up): it leaves the same way.

Stepping, rather than one loop to the end, lets the device loop run other work between steps: an encoder
batch, or another decoding batch's step, never waits for a long generation to finish.
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


class Decoding:
    """Rows decoding together. ``step()`` runs one forward pass; rows leave as they finish or are stopped."""

    def __init__(self, model: Any, rows: list[Row], eos: set[int], pad: int, device: torch.device,
                 text_of: Callable[[list[int]], str]) -> None:
        self.rows = rows
        self._model, self._eos, self._pad, self._device, self._text_of = model, eos, pad, device, text_of
        # the rows still decoding, in the order of the tensors' batch dimension
        self._live = [index for index, row in enumerate(rows) if not row.done]
        input_ids, mask = pad_rows([rows[index].prompt for index in self._live] or [[pad]], pad, device, left=True)
        self._inputs, self._mask = input_ids, mask
        self._positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache: Any = None

    @property
    def done(self) -> bool:
        return not self._live

    def step(self) -> list[int]:
        """One forward pass for every live row (the prompts' prefill, the first time); returns the indices of
        the rows that finished with it."""
        if not self._live:
            return []
        output = self._model(input_ids=self._inputs, attention_mask=self._mask, position_ids=self._positions,
                             past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = output.past_key_values
        logits = output.logits[:, -1, :].float()
        greedy = logits.argmax(dim=-1).tolist()  # one vectorised pass for every greedy row
        tokens: list[int] = []
        finished: list[int] = []
        for slot, index in enumerate(self._live):
            row = self.rows[index]
            token = greedy[slot] if row.temperature <= 0 else pick(logits[slot], row)
            row.completion.append(token)
            if token in self._eos:
                row.ended_by_eos = True
            elif row.stop:
                text = self._text_of(row.completion)
                row.ended_by_stop = any(stop in text for stop in row.stop)
            tokens.append(token)
            if row.done:
                finished.append(index)
        self._inputs = torch.tensor(tokens, device=self._device).unsqueeze(-1)
        self._positions = self._positions[:, -1:] + 1
        self._mask = torch.cat([self._mask, torch.ones((len(tokens), 1), dtype=self._mask.dtype,
                                                       device=self._device)], dim=-1)
        if finished:
            self._keep([index for index in self._live if index not in finished])
        return finished

    def stop(self, index: int) -> None:
        """Take a row out before the next step; what it decoded so far stays in ``rows[index]``."""
        if index in self._live:
            self._keep([live for live in self._live if live != index])

    def _keep(self, indices: list[int]) -> None:
        slots = [self._live.index(index) for index in indices]
        self._live = indices
        if not indices:
            self._cache = None  # the batch is over: give its cache back now
            return
        chosen = torch.tensor(slots, device=self._device)
        self._inputs, self._mask, self._positions = self._inputs[chosen], self._mask[chosen], self._positions[chosen]
        if self._cache is not None:
            self._cache.batch_select_indices(chosen)


def decode(model: Any, rows: list[Row], eos: set[int], pad: int, device: torch.device,
           text_of: Callable[[list[int]], str]) -> None:
    """Fill each row's completion in place, stepping until every row is done."""
    decoding = Decoding(model, rows, eos, pad, device, text_of)
    while not decoding.done:
        decoding.step()
