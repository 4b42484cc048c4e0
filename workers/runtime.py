"""The worker's models and the one thread that owns the device.

Models load once, when the worker starts. Task threads validate their request and hand it to the device
thread, which runs one piece of model work at a time: torch and the fast tokenizers are not safe to
drive from many threads at once, and a single owner is what the batching loop will build on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from producer.contract import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    validate,
)
from producer.errors import InvalidInput, UnknownModel
from producer.settings import Kind, Settings
from workers.models.base import ClassifyModel, EmbedModel, GenerateModel
from workers.models.classify import SequenceClassifier, ZeroShotClassifier
from workers.models.embed import PooledEmbedder
from workers.models.generate import CausalGenerator
from workers.models.loading import pick_device

log = logging.getLogger(__name__)

Result = EmbedResult | ClassifyResult | GenerateResult


class Runtime:
    def __init__(self, settings: Settings, kinds: tuple[Kind, ...]) -> None:
        self.settings = settings
        self.kinds = kinds
        self.device = pick_device(settings.device)
        self.embedders: dict[str, EmbedModel] = {}
        self.classifiers: dict[str, ClassifyModel] = {}
        self.generators: dict[str, GenerateModel] = {}
        self.load_counts: Counter[str] = Counter()
        self.loaded_at: float | None = None
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferq-device")

    # --- start-up -------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every model the served kinds need; runs once, before the worker consumes."""
        self._device_thread.submit(self._load).result()

    def _load(self) -> None:
        started = time.perf_counter()
        registry = self.settings.models
        if "embed" in self.kinds or "classify" in self.kinds:  # zero-shot classify runs on the embedders
            for alias, entry in registry.embed.items():
                self.embedders[alias] = PooledEmbedder.load(alias, entry, self.device)
                self.load_counts[f"embed/{alias}"] += 1
        if "classify" in self.kinds:
            for alias, entry in registry.classify.items():
                self.classifiers[alias] = SequenceClassifier.load(alias, entry, self.device)
                self.load_counts[f"classify/{alias}"] += 1
        if "generate" in self.kinds:
            for alias, entry in registry.generate.items():
                self.generators[alias] = CausalGenerator.load(alias, entry, self.device)
                self.load_counts[f"generate/{alias}"] += 1
        self.loaded_at = time.time()
        log.info("models ready for %s on %s in %.1f s", ",".join(self.kinds), self.device,
                 time.perf_counter() - started)

    def describe(self) -> dict[str, Any]:
        """What the worker serves, for `inferq_status` and health checks."""
        models = {
            kind: {alias: model.loaded.describe() for alias, model in group.items()}
            for kind, group in (("embed", self.embedders), ("classify", self.classifiers),
                                ("generate", self.generators))
        }
        defaults = {kind: self.settings.models.default_alias(kind) for kind in self.kinds}
        status: dict[str, Any] = {"kinds": list(self.kinds), "device": str(self.device),
                                  "ready": self.loaded_at is not None, "models": models, "defaults": defaults,
                                  "load_counts": dict(self.load_counts)}
        if self.device.type == "cuda":
            status["gpu"] = torch.cuda.get_device_name(self.device)
            status["memory_allocated_mib"] = round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
            status["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return status

    def close(self) -> None:
        self._device_thread.shutdown(wait=True)

    # --- serving --------------------------------------------------------------------------------------

    def handle(self, kind: Kind, args: Any, kwargs: Any) -> Result:
        """Validate one task's arguments here, in the task thread, then run it on the device thread."""
        request = validate(kind, kwargs, self.settings.limits, args)
        future = self._device_thread.submit(self._run, request)
        return future.result()

    def _run(self, request: EmbedRequest | ClassifyRequest | GenerateRequest) -> Result:
        with torch.inference_mode():
            if isinstance(request, EmbedRequest):
                return self._embed(request)
            if isinstance(request, ClassifyRequest):
                return self._classify(request)
            return self._generate(request)

    def _embed(self, request: EmbedRequest) -> EmbedResult:
        alias = self._alias("embed", request.model, self.embedders)
        embedder = self.embedders[alias]
        vectors = embedder.embed(list(request.texts), request.normalize)
        return EmbedResult(model=alias, dim=embedder.dim, embeddings=vectors.tolist())

    def _classify(self, request: ClassifyRequest) -> ClassifyResult:
        labels = list(request.labels) if request.labels is not None else None
        name = request.model
        if name is not None and name in self.classifiers:
            classifier: ClassifyModel = self.classifiers[name]
        elif labels is not None:
            alias = self._alias("embed", name, self.embedders, also=self.classifiers)
            classifier = ZeroShotClassifier(self.embedders[alias], self.settings.classify_temperature,
                                            self.settings.classify_label_template)
        elif name is not None and name in self.embedders:
            raise InvalidInput(f"model {name!r} is an embedding model: it classifies zero-shot, so pass labels")
        else:
            default = self.settings.models.default_alias("classify")
            if name is None and default is None:
                raise InvalidInput("no sequence-classification model is configured on this worker: pass labels "
                                   "to classify zero-shot, or configure one under models.classify")
            classifier = self.classifiers[self._alias("classify", name, self.classifiers, also=self.embedders)]
        return ClassifyResult(model=classifier.loaded.alias,
                              results=classifier.classify(list(request.texts), request.top_k, labels))

    def _generate(self, request: GenerateRequest) -> GenerateResult:
        alias = self._alias("generate", request.model, self.generators)
        return self.generators[alias].generate(request)

    def _alias(self, kind: Kind, name: str | None, group: dict[str, Any],
               also: dict[str, Any] | None = None) -> str:
        alias = name if name is not None else self.settings.models.default_alias(kind)
        if alias is None or alias not in group:
            available = sorted(group) + sorted(also or {})
            shown = ", ".join(available) if available else "none configured"
            raise UnknownModel(f"model {name!r} is not configured for {kind} on this worker; "
                               f"available: {shown}")
        return alias
