"""Sentence embeddings from any AutoModel encoder: mean or CLS pooling, optional L2 normalisation."""

from __future__ import annotations

import torch
from transformers import AutoModel

from producer.settings import ModelEntry
from workers.models.encoder import forward, tokenize
from workers.models.loading import LoadedModel, load_model

# Inputs per forward pass and padded tokens per pass when called outside the batching loop.
DEFAULT_PASS = (64, 16384)


class PooledEmbedder:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.dim = int(loaded.config.hidden_size)
        self._pooling = loaded.entry.pooling

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device, weights: bool = True,
             dense: bool = False) -> PooledEmbedder:
        return cls(load_model("embed", alias, entry, AutoModel, device, weights, dense))

    def tokenize(self, texts: list[str], what: str = "texts") -> list[list[int]]:
        """Thread-safe; raises InputTooLarge for a text over the model's token limit."""
        return tokenize(self.loaded, texts, what)

    def vectors(self, ids: list[list[int]], max_items: int, max_tokens: int) -> torch.Tensor:
        """Pooled, not normalised, one row per input. Device work."""
        return forward(self.loaded, ids, self._pool, max_items, max_tokens)

    def embed(self, texts: list[str], normalize: bool) -> torch.Tensor:
        """Both steps at once, for callers outside the worker (calibration, checks)."""
        vectors = self.vectors(self.tokenize(texts), *DEFAULT_PASS)
        return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
