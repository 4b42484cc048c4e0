"""On a CUDA device: models load there in half precision and agree with the CPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from producer.settings import ModelRegistry, Settings
from workers.runtime import Runtime

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = ["A cat sits on the mat.", "Stock markets fell sharply today.", "Knead the dough."]


def only(kind: str) -> ModelRegistry:
    """The configured registry (INFERQ_MODELS__* on a GPU machine), with the other kinds left out."""
    return Settings().models.model_copy(update={k: {} for k in ("embed", "classify", "generate") if k != kind})


def test_embed_on_cuda_matches_cpu_in_half_precision() -> None:
    registry = only("embed")
    gpu = Runtime(Settings(models=registry, device="cuda"), ("embed",))
    cpu = Runtime(Settings(models=registry, device="cpu"), ("embed",))
    gpu.load()
    cpu.load()
    described = gpu.describe()["models"]["embed"]["minilm"]
    assert described["device"].startswith("cuda")
    assert described["dtype"] in ("bfloat16", "float16")
    on_gpu = torch.tensor(gpu.handle("embed", (), {"texts": TEXTS})["embeddings"])  # type: ignore[typeddict-item]
    on_cpu = torch.tensor(cpu.handle("embed", (), {"texts": TEXTS})["embeddings"])  # type: ignore[typeddict-item]
    cosine = (on_gpu * on_cpu).sum(-1)
    assert bool((cosine > 0.99).all()), cosine


def test_generate_on_cuda() -> None:
    runtime = Runtime(Settings(models=only("generate"), device="cuda"), ("generate",))
    runtime.load()
    result = runtime.handle("generate", (), {"prompt": "The capital of France is", "max_new_tokens": 8})
    assert result["completion_tokens"] >= 1  # type: ignore[typeddict-item]
