"""One small protocol per kind; the runtime only talks to these."""

from __future__ import annotations

from typing import Protocol

import torch

from producer.contract import GenerateRequest, GenerateResult, LabelScore
from workers.models.loading import LoadedModel


class EmbedModel(Protocol):
    loaded: LoadedModel
    dim: int

    def embed(self, texts: list[str], normalize: bool) -> torch.Tensor:
        """One float32 CPU row per text, in order."""
        ...


class ClassifyModel(Protocol):
    loaded: LoadedModel

    def classify(self, texts: list[str], top_k: int, labels: list[str] | None) -> list[list[LabelScore]]:
        """Per text, the top_k labels with their scores, best first."""
        ...


class GenerateModel(Protocol):
    loaded: LoadedModel

    def generate(self, request: GenerateRequest) -> GenerateResult:
        ...
