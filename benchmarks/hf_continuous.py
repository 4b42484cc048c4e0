"""Our device loop against transformers' own ContinuousBatchingManager, on one mixed workload, in one process.

    python -m benchmarks.hf_continuous [--prompts 64] [--new-tokens 8-256] [--rounds 2]

The same greedy prompts (``Story i: once upon a time``, each asking for its own ``max_new_tokens`` drawn as
``inferq bench --new-tokens`` draws it) all arrive at once, and the clock runs from the first submit to the
last answer: (a) through our device loop (the batch runner a worker uses: step-at-a-time decoding, rows
joining and leaving, chunked prefill and the cache budget; no queue, no Redis); (b) through transformers'
``ContinuousBatchingManager`` (paged attention), each request added with its own ``max_new_tokens``. The
manager's KV cache is sized by hand (``num_blocks``, ``max_batch_tokens``) to hold every request at once,
as it otherwise sizes itself from the whole machine's memory on a CPU. Prints one JSON line per run with
generated tokens/s, and whether every greedy text matched between the two.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.load import new_tokens_of, parse_new_tokens
from producer.contract import GenerateRequest
from producer.settings import Settings
from workers.device.passes import Models, start_loop
from workers.models.generate import CausalGenerator
from workers.models.loading import pick_device


def ours(settings: Settings, generator: CausalGenerator, asked: list[int]) -> tuple[float, list[list[int]]]:
    device = pick_device(settings.device)
    alias = generator.loaded.alias
    loop = start_loop(settings, Models(generators={alias: generator}), device)
    try:
        prepared = [generator.prepare(GenerateRequest(prompt=f"Story {i}: once upon a time", max_new_tokens=n))
                    for i, n in enumerate(asked)]
        started = time.perf_counter()
        futures = [loop.submit(f"generate/{alias}", p, 1, len(p.prompt) + n, timeout=3600)
                   for p, n in zip(prepared, asked, strict=True)]
        completions = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
    finally:
        loop.stop()
    return elapsed, [completion.tokens for completion in completions]


def theirs(generator: CausalGenerator, asked: list[int]) -> tuple[float, list[list[int]]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, tokenizer = generator.loaded.model, generator.loaded.tokenizer
    ids = [tokenizer(f"Story {i}: once upon a time").input_ids for i in range(len(asked))]
    page = 256
    longest = max(len(prompt) + n for prompt, n in zip(ids, asked, strict=True))
    blocks = len(asked) * -(-longest // page)  # every request's whole length at once, in pages
    config = GenerationConfig(do_sample=False, max_new_tokens=max(asked),  # type: ignore[no-untyped-call]
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0)
    cb_config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=4096,
                                         max_requests_per_batch=len(asked))
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
    manager.start()
    try:
        started = time.perf_counter()
        request_ids = [manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
                       for i, (prompt, n) in enumerate(zip(ids, asked, strict=True))]
        results: dict[str, Any] = {}
        while len(results) < len(request_ids):
            output = manager.get_result(timeout=600)
            if output is None:
                raise RuntimeError("the manager stopped before answering every request")
            if output.is_finished():
                results[output.request_id] = output
        elapsed = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=60)
    return elapsed, [list(results[f"r{i}"].generated_tokens) for i in range(len(asked))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", default="8-256")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = Settings()
    alias = settings.models.default_alias("generate")
    assert alias is not None
    generator = CausalGenerator.load(alias, settings.models.generate[alias], pick_device(settings.device))
    spec = parse_new_tokens(args.new_tokens)
    asked = [new_tokens_of(spec, i) for i in range(args.prompts)]
    with torch.inference_mode():
        for round_ in range(1, args.rounds + 1):
            ours_s, ours_tokens = ours(settings, generator, asked)
            theirs_s, theirs_tokens = theirs(generator, asked)
            print(json.dumps({
                "round": round_, "prompts": args.prompts, "new_tokens": args.new_tokens,
                "ours_tokens_per_s": round(sum(map(len, ours_tokens)) / ours_s, 1),
                "theirs_tokens_per_s": round(sum(map(len, theirs_tokens)) / theirs_s, 1),
                "ours_tokens": sum(map(len, ours_tokens)), "theirs_tokens": sum(map(len, theirs_tokens)),
                "same_text": sum(a == b for a, b in zip(ours_tokens, theirs_tokens, strict=True)),
            }), flush=True)


if __name__ == "__main__":
    main()
