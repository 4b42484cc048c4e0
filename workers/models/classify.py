"""Two ways to classify: a fine-tuned sequence-classification checkpoint, or zero-shot over an embedder."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from producer.contract import LabelScore
from producer.errors import InvalidInput
from producer.settings import ModelEntry
from workers.models.base import EmbedModel
from workers.models.encoder import encode
from workers.models.loading import LoadedModel, load_model


def _top_k(probabilities: torch.Tensor, labels: list[str], top_k: int) -> list[list[LabelScore]]:
    k = min(top_k, len(labels))  # top_k is capped at the number of labels
    scores, indices = probabilities.topk(k, dim=-1)
    return [
        [LabelScore(label=labels[int(i)], score=float(s)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
    ]


class SequenceClassifier:
    """A checkpoint with its own labels (config.id2label); softmax over its logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        id2label = loaded.model.config.id2label
        self.labels = [str(id2label[i]) for i in range(len(id2label))]

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device) -> SequenceClassifier:
        return cls(load_model("classify", alias, entry, AutoModelForSequenceClassification, device))

    def classify(self, texts: list[str], top_k: int, labels: list[str] | None) -> list[list[LabelScore]]:
        if labels is not None:
            raise InvalidInput(f"model {self.loaded.alias!r} classifies into its own labels "
                               f"({', '.join(self.labels)}); omit labels, or omit model to classify "
                               "zero-shot into the labels you pass")
        logits = encode(self.loaded, texts, "texts")
        return _top_k(logits.softmax(dim=-1), self.labels, top_k)


class ZeroShotClassifier:
    """Scores are softmax(cosine(text, label) / temperature) over the given labels, so they sum to 1."""

    def __init__(self, embedder: EmbedModel, temperature: float, template: str) -> None:
        self.embedder = embedder
        self.loaded = embedder.loaded
        self.temperature = temperature
        self.template = template

    def classify(self, texts: list[str], top_k: int, labels: list[str] | None) -> list[list[LabelScore]]:
        if not labels:
            raise InvalidInput("zero-shot classification needs labels: pass labels as a list of strings")
        vectors = self.embedder.embed(texts, normalize=True)
        label_vectors = self.embedder.embed([self.template.format(label) for label in labels], normalize=True)
        similarities = vectors @ label_vectors.T
        return _top_k((similarities / self.temperature).softmax(dim=-1), labels, top_k)
