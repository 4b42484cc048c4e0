"""The models a worker serves, and what the device loop runs for each of them.

Both sides of a worker load the same registry: the side that owns the device loads weights and builds one
batch runner per model key (``embed/<alias>``, ``classify/<alias>``, ``generate/<alias>``); a receiving
process whose device process holds the weights loads tokenizers and configs only. Keys are the same on
both sides, so a request prepared in one process runs under its key in the other.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from producer.settings import Kind, Settings
from workers.device.batching import BatchLimits
from workers.device.jobs import Runner
from workers.device.loop import BatchKind, DeviceLoop
from workers.device.metrics import sample_device_memory
from workers.device.stall import exit_on_stall
from workers.device.stepping import SteppedKind, Stepping
from workers.models.base import ClassifyModel, EmbedModel, GenerateModel
from workers.models.classify import SequenceClassifier
from workers.models.embed import PooledEmbedder
from workers.models.generate import CausalGenerator, GenerationBatch, Prepared

log = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """Token ids to run through an encoder; the result is one float32 row per input, in order."""

    ids: list[list[int]]


@dataclass
class Models:
    embedders: dict[str, EmbedModel] = field(default_factory=dict)
    classifiers: dict[str, ClassifyModel] = field(default_factory=dict)
    generators: dict[str, GenerateModel] = field(default_factory=dict)
    load_counts: Counter[str] = field(default_factory=Counter)

    def keys(self) -> list[str]:
        return sorted([f"embed/{alias}" for alias in self.embedders]
                      + [f"classify/{alias}" for alias in self.classifiers]
                      + [f"generate/{alias}" for alias in self.generators])

    def describe(self) -> dict[str, dict[str, Any]]:
        return {kind: {alias: model.loaded.describe() for alias, model in group.items()}
                for kind, group in (("embed", self.embedders), ("classify", self.classifiers),
                                    ("generate", self.generators))}


def load_models(settings: Settings, kinds: tuple[Kind, ...], device: torch.device, weights: bool) -> Models:
    """Every model the served kinds need. Zero-shot classify runs on the embedders, so classify loads them too."""
    registry, models = settings.models, Models()
    if "embed" in kinds or "classify" in kinds:
        for alias, entry in registry.embed.items():
            models.embedders[alias] = PooledEmbedder.load(alias, entry, device, weights)
            models.load_counts[f"embed/{alias}"] += 1
    if "classify" in kinds:
        for alias, entry in registry.classify.items():
            models.classifiers[alias] = SequenceClassifier.load(alias, entry, device, weights)
            models.load_counts[f"classify/{alias}"] += 1
    if "generate" in kinds:
        for alias, entry in registry.generate.items():
            models.generators[alias] = CausalGenerator.load(alias, entry, device, weights)
            models.load_counts[f"generate/{alias}"] += 1
    return models


def start_loop(settings: Settings, models: Models, device: torch.device) -> DeviceLoop:
    """The device loop over these models, started, with the stall watch that ends the process if it hangs."""
    budget = cache_budget(settings, device) if models.generators else None
    if budget is not None:
        source = ("INFERQ_BATCHING__GENERATE_CACHE_MB" if settings.batching.generate_cache_mb is not None
                  else "half the memory free after loading" if device.type == "cuda" else "the CPU default")
        log.info("generate cache budget on %s: %d MiB (%s)", device, budget // 2**20, source)
    loop = DeviceLoop(batch_kinds(settings, models, device), cache_budget=budget)
    loop.start()
    sample_device_memory(device)
    threading.Thread(target=exit_on_stall, args=(loop, settings.time_limits.device_stall), name="inferq-stall-watch",
                     daemon=True).start()
    return loop


CPU_CACHE_MB = 4096  # a CPU's default cache budget: a fixed size, never a share of the machine's memory


def cache_budget(settings: Settings, device: torch.device) -> int:
    """Bytes of KV cache the generate batches on this device may reserve: the setting, or on CUDA half the
    memory free once the models are loaded (the other half is for activations, encoder batches and the
    allocator's slack), or a fixed size on a CPU."""
    if settings.batching.generate_cache_mb is not None:
        return settings.batching.generate_cache_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    return CPU_CACHE_MB * 2**20


def batch_kinds(settings: Settings, models: Models, device: torch.device) -> dict[str, BatchKind | SteppedKind]:
    """One batch runner per model key, under the batching settings."""
    batching = settings.batching
    encode = BatchLimits(batching.encode_max_texts, batching.encode_max_tokens, batching.max_wait_ms / 1000)
    generate = BatchLimits(batching.generate_max_prompts, batching.generate_max_tokens,
                           batching.generate_max_wait_ms / 1000)
    passes = Passes(settings, device)
    kinds: dict[str, BatchKind | SteppedKind] = {}
    for alias, embedder in models.embedders.items():
        kinds[f"embed/{alias}"] = BatchKind(passes.encoder(embedder.vectors), encode)
    for alias, classifier in models.classifiers.items():
        kinds[f"classify/{alias}"] = BatchKind(passes.encoder(classifier.probabilities), encode)
    for alias, generator in models.generators.items():
        kinds[f"generate/{alias}"] = SteppedKind(passes.generator(generator), generate,
                                                 batching.generate_max_running, batching.generate_continuous,
                                                 generator.cache_bytes_per_token)
    return kinds


class Passes:
    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device

    def encoder(self, run: Any) -> Runner:
        batching = self.settings.batching

        def runner(jobs: list[EncodeJob]) -> list[torch.Tensor]:
            # every request's inputs in one set of length-sorted passes; each gets its own rows back
            inputs = [ids for job in jobs for ids in job.ids]
            with torch.inference_mode(), self._freeing_memory_on_oom():
                self._simulate_oom(inputs)
                rows = run(inputs, batching.encode_max_texts, batching.encode_max_tokens)
            return list(torch.split(rows, [len(job.ids) for job in jobs]))

        return runner

    def generator(self, generator: GenerateModel) -> Callable[[list[Prepared]], Stepping]:
        chunk = self.settings.batching.generate_prefill_chunk

        def start(batch: list[Prepared]) -> Stepping:
            return _Guarded(generator.start(batch, chunk), self._freeing_memory_on_oom)

        return start

    @contextlib.contextmanager
    def _freeing_memory_on_oom(self) -> Iterator[None]:
        # The device loop retries a failed batch in halves; give the halves the memory the failure held.
        try:
            yield
        except torch.OutOfMemoryError as exc:
            # The failed pass's frames hold its activations, and the exception (kept by the requests' futures)
            # holds the frames: let them go now, not at the garbage collector's next sweep.
            traceback.clear_frames(exc.__traceback__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise

    def _simulate_oom(self, inputs: list[list[int]]) -> None:
        limit = self.settings.fault_oom_above_tokens
        if limit is None:  # the normal case: nothing to compute on the device loop's path
            return
        padded = max(len(ids) for ids in inputs) * len(inputs)
        if padded > limit:
            raise torch.OutOfMemoryError(f"simulated CUDA out of memory: {padded} padded tokens > {limit} "
                                         "(fault_oom_above_tokens)")


class _Guarded:
    """A generate batch whose every step runs in inference mode, and frees the device's memory if it fails."""

    def __init__(self, batch: GenerationBatch, guard: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._batch, self._guard = batch, guard

    @property
    def done(self) -> bool:
        return self._batch.done

    @property
    def prefilling(self) -> bool:
        return self._batch.prefilling

    def step(self, alone: bool = False) -> list[tuple[int, Any]]:
        with torch.inference_mode(), self._guard():
            return list(self._batch.step(alone))

    def produced(self, index: int) -> list[int]:
        return self._batch.produced(index)

    def stop(self, index: int) -> int:
        with torch.inference_mode(), self._guard():
            return self._batch.stop(index)

    def absorb(self, other: Any) -> list[int] | None:
        if not isinstance(other, _Guarded):
            return None
        with torch.inference_mode(), self._guard():
            return self._batch.absorb(other._batch)
