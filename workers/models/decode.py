"""Batched decoding a step at a time, where every row keeps its own settings, as if it ran alone.

One forward pass per step serves every live row; each row then picks its token with its own temperature,
top_p and random generator, so a seeded request samples the same text whether it shares the batch or
not, and a greedy row is never touched by a sampled one. Prompts are left-padded; positions count only
real tokens. A row stops at an end-of-sequence token, at its own max_new_tokens, or once its text
contains one of its stop strings, and leaves the batch at once: its caller gets its answer then, not when
the longest row is done, and the rows left compute no more for it. A row can also be stopped from outside
between steps (its caller gave up): it leaves the same way. A row whose scores are not all finite (its
precision overflowed: float16 does on some inputs) can pick no token: it leaves with that error (``failed``)
and the others go on; a step that raised for it failed every row, and they all started again.

Stepping, rather than one loop to the end, lets the device loop run other work between steps: an encoder
batch, or another decoding batch's step, never waits for a long generation to finish. For the same reason a
long prefill runs in chunks (``prefill_chunk`` padded prompt tokens a pass): each chunk is a step that
decodes nothing, and between chunks the device loop steps the batches already decoding, so a long prompt
does not hold every decoding row for the whole of its prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from workers.models.encoder import pad as pad_rows

# A chunk of a batched prefill covers at least this many prompt columns, however many rows share it: fewer
# would take a pass per handful of tokens, and a long prompt's prefill would cost more passes than it saves.
MIN_CHUNK_COLUMNS = 16
# A row with stop strings checks the text of its last tokens only (Decoding._stopped): at first this many,
# doubled until their text spans its newest token, its longest stop string and this many characters more.
STOP_WINDOW_TOKENS = 8
STOP_MARGIN_CHARS = 16


@dataclass
class Row:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()  # control tokens asked for as stop strings: the text never shows them
    completion: list[int] = field(default_factory=list)
    ended_by_token: bool = False  # an end-of-sequence token, or a control token asked for as a stop
    ended_by_stop: bool = False
    failed: str | None = None  # why it could not go on (its scores were not finite)

    @property
    def done(self) -> bool:
        return (self.ended_by_token or self.ended_by_stop or self.failed is not None
                or len(self.completion) >= self.max_new_tokens)


def pick(logits: torch.Tensor, row: Row) -> int:
    """The next token of one row from its float32 logits over the vocabulary."""
    if row.temperature <= 0:
        return int(logits.argmax())
    # less the largest first, and by a temperature no smaller than float32's smallest normal number: divided
    # by a tiny one (the contract allows any above 0) the logits overflowed to inf, or a temperature that is 0
    # in float32 gave 0/0, and the softmax of either is NaN; this way the largest is 0 and the rest at most 0
    temperature = max(row.temperature, torch.finfo(logits.dtype).tiny)
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p; the first token always stays, even for a top_p
        # so small that it is 0 in float32
        outside = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=row.generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=row.generator))


class Decoding:
    """Rows decoding together. ``step()`` runs one forward pass; rows leave as they finish or are stopped."""

    def __init__(self, model: Any, rows: list[Row], eos: set[int], pad: int, device: torch.device,
                 text_of: Callable[[list[int]], str], prefill_chunk: int = 0) -> None:
        # the rows by index, until released once their completion was collected: a batch that lives on as
        # rows join and leave keeps only its live rows (a list of released slots grew with every request)
        self.rows: dict[int, Row] = dict(enumerate(rows))
        self._indices = len(rows)  # indices given so far: a joined row gets the next
        self._model, self._eos, self._pad, self._device, self._text_of = model, eos, pad, device, text_of
        # the rows still decoding, in the order of the tensors' batch dimension
        self._live = [index for index, row in enumerate(rows) if not row.done]
        input_ids, mask = pad_rows([rows[index].prompt for index in self._live] or [[pad]], pad, device, left=True)
        self._inputs, self._mask = input_ids, mask
        self._positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache: Any = None
        # Prompt columns already run through the model; while fewer than all, steps are prefill chunks of
        # ``_chunk_columns`` columns each (the whole prompt at once without a chunk size).
        self._prefilled, self._prompt_columns = 0, int(mask.shape[1])
        rows_now = max(1, len(self._live))
        self._chunk_columns = (max(MIN_CHUNK_COLUMNS, prefill_chunk // rows_now) if prefill_chunk > 0
                               else self._prompt_columns)

    @property
    def done(self) -> bool:
        return not self._live

    @property
    def prefilling(self) -> bool:
        """Whether the prompts are still being run through the model (no token decoded yet)."""
        return self._live != [] and self._prefilled < self._prompt_columns

    def step(self, alone: bool = False) -> list[int]:
        """One forward pass for every live row: the next chunk of the prompts' prefill (the last chunk also
        picks every row's first token; ``alone``, with nothing else waiting for the device, the chunk is the
        rest of the prompts), or one token; returns the indices of the rows that finished with it."""
        if not self._live:
            return []
        inputs, mask, positions = self._inputs, self._mask, self._positions
        if self.prefilling:  # the next chunk of prompt columns, attending to every column before it
            start = self._prefilled
            end = self._prompt_columns if alone else min(self._prompt_columns, start + self._chunk_columns)
            inputs, mask, positions = inputs[:, start:end], mask[:, :end], positions[:, start:end]
            self._prefilled = end
        output = self._model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=self._cache,
                             use_cache=True, logits_to_keep=1)
        self._cache = output.cache
        if self.prefilling:
            return []
        self._trim()  # columns only rows stopped during the prefill used
        logits = output.logits[:, -1, :].float()
        # one vectorised pass for every greedy row, which also marks a row that can pick no token (-1): one whose
        # best score is not finite, as a NaN anywhere makes it (-inf scores alone are tokens ruled out: fine)
        best = logits.max(dim=-1)
        greedy = torch.where(torch.isfinite(best.values), best.indices, -1).tolist()
        tokens: list[int] = []
        finished: list[int] = []
        for slot, index in enumerate(self._live):
            row = self.row(index)
            if greedy[slot] < 0:
                row.failed = (f"the model's scores were not finite after {len(row.completion)} tokens (its "
                              "precision overflowed); this row stopped, the others went on")
                tokens.append(self._pad)
                finished.append(index)
                continue
            token = greedy[slot] if row.temperature <= 0 else pick(logits[slot], row)
            row.completion.append(token)
            if token in self._eos or token in row.stop_ids:
                row.ended_by_token = True
            elif row.stop:
                row.ended_by_stop = self._stopped(row)
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

    def _stopped(self, row: Row) -> bool:
        """Whether the row's text now holds one of its stop strings. Only its end is decoded: a stop that is new
        ends within the newest token's characters, so the characters the longest stop spans, with a margin for
        a token whose text depends on the one before it, are enough. Decoding the whole completion every step
        cost time growing with its length (about 0.7 ms a row at 1,000 tokens with the test tokenizer: 45 ms a
        step for 64 rows, longer than a GPU's decoding step; benchmarks/stop_check.py)."""
        # the text before the newest token must span the longest stop and the margin: a long newest token (a
        # run of spaces) could otherwise fill the window alone, and a stop ending in it be missed
        need = max(map(len, row.stop)) + STOP_MARGIN_CHARS + len(self._text_of(row.completion[-1:]))
        window = STOP_WINDOW_TOKENS
        while True:
            text = self._text_of(row.completion[-window:])
            if len(text) >= need or window >= len(row.completion):
                return any(stop in text for stop in row.stop)
            window *= 2

    def join(self, other: Decoding) -> list[int] | None:
        """Take ``other``'s live rows into this batch, between steps: continuous batching. ``other`` must have
        run its first step (its prefill), so both sides are at the same point of a step: a cache, the next
        input token and position per row. The shorter side is left-padded (masked) to the longer's length and
        the two are stacked, so from the next step on one pass serves both. Returns the indices the joined
        rows have here (``other``'s order), or None where the caches cannot be merged this way (anything but
        plain per-layer key/value tensors, such as a sliding-window cache); nothing changes then."""
        if self.prefilling or other.prefilling:
            raise RuntimeError("a batch joins another only once both have run their prompts' prefill")
        if (other._cache is None or not other._live or self._cache is None or not self._live
                or not (_mergeable(self._cache) and _mergeable(other._cache))
                or len(self._cache.layers) != len(other._cache.layers)):
            return None
        length = max(self._mask.shape[1], other._mask.shape[1])
        # every new tensor first, then the swap: a failure (out of memory) leaves both batches as they were
        merged = [(torch.cat([_left_pad(mine.keys, length - 1, 2), _left_pad(joined.keys, length - 1, 2)]),
                   torch.cat([_left_pad(mine.values, length - 1, 2), _left_pad(joined.values, length - 1, 2)]))
                  for mine, joined in zip(self._cache.layers, other._cache.layers, strict=True)]
        mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(other._mask, length, 1)])
        inputs = torch.cat([self._inputs, other._inputs])
        positions = torch.cat([self._positions, other._positions])
        for layer, (keys, values) in zip(self._cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self._mask, self._inputs, self._positions = mask, inputs, positions
        offset = self._indices
        self.rows.update((offset + index, row) for index, row in other.rows.items())
        self._indices += other._indices
        self._live.extend(offset + index for index in other._live)
        other._live, other._cache = [], None  # its rows live here now
        self._trim()
        return [offset + index for index in range(other._indices)]

    def row(self, index: int) -> Row:
        row = self.rows.get(index)
        if row is None:
            raise RuntimeError(f"row {index} was released")
        return row

    def release(self, index: int) -> None:
        """Forget a row that left the batch, once its completion was collected."""
        if index not in self._live:
            self.rows.pop(index, None)

    @property
    def live_rows(self) -> int:
        return len(self._live)

    @property
    def width(self) -> int:
        """Columns of the attention mask: the cache's length plus the next token's."""
        return int(self._mask.shape[1])

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
            try:
                self._cache.batch_select_indices(chosen)
            except Exception:  # out of memory, say: this batch is over; give its cache back before rows restart
                self._cache, self._live = None, []
                raise
            self._trim()

    def _trim(self) -> None:
        """Drop the leading columns no live row uses (padding for rows that left, or for a longer batch that
        joined and left): otherwise a batch that lives on as rows come and go would attend over, and keep, a
        cache as long as its whole life rather than as its longest live row. Not while the prefill runs: its
        chunks are counted in prompt columns."""
        if self._cache is None or not _mergeable(self._cache) or self.prefilling:
            return
        used = self._mask.any(dim=0)
        first = int(used.int().argmax())  # the mask's last column (the next token) is always used
        if first == 0:
            return
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:, :], layer.values[:, :, first:, :]


def _mergeable(cache: Any) -> bool:
    # plain layers hold [batch, heads, tokens, head_dim] tensors for every position; sliding-window, quantised
    # or static layers keep other shapes or state, and are not stacked here
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer and layer.keys is not None
                                                   for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros in front along ``dim`` up to ``length``: masked positions for a mask, unused slots for a cache."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

