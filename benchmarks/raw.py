"""The raw model: the same weights the worker serves, in a tight batched loop with nothing around them."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.load import NewTokens, new_tokens_of
from producer.settings import Settings
from workers.models.embed import PooledEmbedder
from workers.models.generate import CausalGenerator
from workers.models.loading import pick_device


def texts_for(n: int) -> list[str]:
    return [f"request {i}: a short sentence about queues, batching and the GPUs that answer them" for i in range(n)]


def load_embedder(settings: Settings) -> PooledEmbedder:
    device = pick_device(settings.device)
    alias = settings.models.default_alias("embed")
    assert alias is not None
    return PooledEmbedder.load(alias, settings.models.embed[alias], device)


def encode_rate(embedder: PooledEmbedder, batch: int, seconds: float) -> float:
    """texts/s of tokenise + forward (+ pooling) in batches of ``batch``, for ``seconds``."""
    device = embedder.loaded.device
    texts = texts_for(batch)
    with torch.inference_mode():
        embedder.vectors(embedder.tokenize(texts), batch, 10**9)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            embedder.vectors(embedder.tokenize(texts), batch, 10**9)
            _sync(device)
            done += batch
        return done / (time.perf_counter() - started)


def raw_encode(settings: Settings, batch: int, seconds: float,
               embedder: PooledEmbedder | None = None) -> dict[str, Any]:
    """texts/s in batches of ``batch``; also one text alone (median of 50)."""
    embedder = embedder or load_embedder(settings)
    rate = encode_rate(embedder, batch, seconds)
    return {"model": embedder.loaded.alias, "batch": batch, "texts_per_s": rate, "single_ms_p50": single_ms(embedder)}


def single_ms(embedder: PooledEmbedder) -> float:
    """Median milliseconds of tokenise + forward for one text alone (50 texts)."""
    singles = []
    with torch.inference_mode():
        for text in texts_for(50):
            t0 = time.perf_counter()
            embedder.vectors(embedder.tokenize([text]), 1, 10**9)
            _sync(embedder.loaded.device)
            singles.append(time.perf_counter() - t0)
    return statistics.median(singles) * 1000


def raw_generate(settings: Settings, batch: int, new_tokens: NewTokens, rounds: int) -> dict[str, Any]:
    """Generated tokens/s of Hugging Face ``generate`` (greedy, left-padded) over ``batch`` prompts.

    With a range of new tokens, prompt i asks for ``new_tokens_of(range, i)``, as through the queue: one
    static batch runs to the longest, and only the tokens each prompt asked for are counted."""
    from transformers import GenerationConfig

    device = pick_device(settings.device)
    alias = settings.models.default_alias("generate")
    assert alias is not None
    generator = CausalGenerator.load(alias, settings.models.generate[alias], device)
    model, tokenizer = generator.loaded.model, generator.loaded.tokenizer
    tokenizer.padding_side = "left"
    prompts = [f"Story {i}: once upon a time" for i in range(batch)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    asked = [new_tokens_of(new_tokens, i) for i in range(batch)]
    config = GenerationConfig(max_new_tokens=max(asked), min_new_tokens=max(asked), do_sample=False,  # type: ignore[no-untyped-call]
                              pad_token_id=tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        model.generate(**inputs, generation_config=config)  # warm-up
        started = time.perf_counter()
        for _ in range(rounds):
            model.generate(**inputs, generation_config=config)
            _sync(device)
        elapsed = time.perf_counter() - started
    return {"model": alias, "batch": batch, "new_tokens": new_tokens,
            "tokens_per_s": sum(asked) * rounds / elapsed}


def first_token_ms(settings: Settings, prompt: str = "Story 0: once upon a time",
                   rounds: int = 20) -> dict[str, float]:
    """Median milliseconds of one prompt's prefill (its first token comes from it) and of one decoding step
    after it, run by hand on the model with its cache (no generate() around them): what a streamed request's
    first text needs at the least."""
    device = pick_device(settings.device)
    alias = settings.models.default_alias("generate")
    assert alias is not None
    generator = CausalGenerator.load(alias, settings.models.generate[alias], device)
    model, tokenizer = generator.loaded.model, generator.loaded.tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    prefills, steps = [], []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first is a warm-up
            started = time.perf_counter()
            prefill = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            first = prefill.logits[:, -1:].argmax(-1)
            _sync(device)
            prefilled = time.perf_counter()
            model(input_ids=first, cache=prefill.cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
            _sync(device)
            prefills.append(prefilled - started)
            steps.append(time.perf_counter() - prefilled)
    return {"prefill_ms_p50": statistics.median(prefills[1:]) * 1000,
            "step_ms_p50": statistics.median(steps[1:]) * 1000}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
