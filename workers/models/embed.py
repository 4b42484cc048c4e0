"""Sentence embeddings from any AutoModel encoder: mean or CLS pooling, optional L2 normalisation."""

from __future__ import annotations

import torch
from transformers import AutoModel

from producer.settings import ModelEntry
from workers.models.encoder import encode
from workers.models.loading import LoadedModel, load_model


class PooledEmbedder:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.dim = int(loaded.model.config.hidden_size)
        self._pooling = loaded.entry.pooling

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device) -> PooledEmbedder:
        return cls(load_model("embed", alias, entry, AutoModel, device))

    def embed(self, texts: list[str], normalize: bool) -> torch.Tensor:
        vectors = encode(self.loaded, texts, "texts", self._pool)
        return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
