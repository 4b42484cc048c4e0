"""Two ways to classify: a fine-tuned sequence-classification checkpoint, or zero-shot over an embedder."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from producer.contract import LabelScore
from producer.settings import ModelEntry
from workers.models.encoder import forward, tokenize
from workers.models.loading import LoadedModel, load_model


def top_k(probabilities: torch.Tensor, labels: list[str], k: int) -> list[list[LabelScore]]:
    """Per row, the k best labels with their scores, best first; k is capped at the number of labels."""
    scores, indices = probabilities.topk(min(k, len(labels)), dim=-1)
    return [
        [LabelScore(label=labels[int(i)], score=float(s)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
    ]


def zero_shot(texts: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cosine(text, label) / temperature) over the labels: each row sums to 1."""
    texts = torch.nn.functional.normalize(texts, dim=-1)
    labels = torch.nn.functional.normalize(labels, dim=-1)
    return ((texts @ labels.T) / temperature).softmax(dim=-1)


class SequenceClassifier:
    """A checkpoint with its own labels (config.id2label); softmax over its logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        id2label = loaded.config.id2label
        self.labels = [str(id2label[i]) for i in range(len(id2label))]

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device, weights: bool = True,
             dense: bool = False) -> SequenceClassifier:
        return cls(load_model("classify", alias, entry, AutoModelForSequenceClassification, device, weights, dense))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return tokenize(self.loaded, texts, "texts")

    def probabilities(self, ids: list[list[int]], max_items: int, max_tokens: int) -> torch.Tensor:
        return forward(self.loaded, ids, None, max_items, max_tokens).softmax(dim=-1)
