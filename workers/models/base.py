"""One small protocol per kind; the runtime talks only to these.

Each splits its work in two: what task threads may do concurrently (tokenise, prepare, finish) and what
only the device loop does, for a whole batch at once (vectors, probabilities, start or run).
"""

from __future__ import annotations

from typing import Protocol

import torch

from producer.contract import GenerateRequest, GenerateResult
from workers.models.generate import Completion, GenerationBatch, Prepared
from workers.models.loading import LoadedModel


class EmbedModel(Protocol):
    loaded: LoadedModel
    dim: int

    def tokenize(self, texts: list[str], what: str = "texts") -> list[list[int]]: ...

    def vectors(self, ids: list[list[int]], max_items: int, max_tokens: int) -> torch.Tensor:
        """Pooled, not normalised: one float32 CPU row per input, in order."""
        ...


class ClassifyModel(Protocol):
    loaded: LoadedModel
    labels: list[str]

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def probabilities(self, ids: list[list[int]], max_items: int, max_tokens: int) -> torch.Tensor:
        """One row of label probabilities per input, in order."""
        ...


class GenerateModel(Protocol):
    loaded: LoadedModel

    def prepare(self, request: GenerateRequest, task_id: str | None = None) -> Prepared: ...

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one row holds (for the device's cache budget)."""
        ...

    def start(self, batch: list[Prepared], prefill_chunk: int = 0) -> GenerationBatch:
        """The batch, to be decoded a step at a time by the device loop; its prefill in chunks of at most
        ``prefill_chunk`` padded tokens (0: whole)."""
        ...

    def run(self, batch: list[Prepared]) -> list[Completion | Exception]: ...

    def finish(self, prepared: Prepared, completion: Completion) -> GenerateResult: ...

    def settled(self, prepared: Prepared, tokens: list[int]) -> str:
        """The text of a completion under way that the final text is sure to start with."""
        ...
