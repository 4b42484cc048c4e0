"""Our batched decode loop against Hugging Face ``generate`` on the same batch, with nothing else running.

Separates the decode loop's own speed from what the worker around it costs:

    python benchmarks/decode_vs_generate.py --batch 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from producer.contract import GenerateRequest
from producer.settings import Settings
from workers.models.generate import CausalGenerator, Completion
from workers.models.loading import pick_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    settings = Settings()
    device = pick_device(settings.device)
    alias = settings.models.default_alias("generate")
    assert alias is not None
    generator = CausalGenerator.load(alias, settings.models.generate[alias], device)
    prompts = [f"Story {i}: once upon a time" for i in range(args.batch)]
    tokenizer, model = generator.loaded.tokenizer, generator.loaded.model
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,  # type: ignore[no-untyped-call]
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    prepared = [generator.prepare(GenerateRequest(prompt=p, max_new_tokens=args.new_tokens)) for p in prompts]
    with torch.inference_mode():
        for name, run in (("hf generate", lambda: model.generate(**inputs, generation_config=config)),
                          ("inferq decode", lambda: generator.run(prepared))):
            run()  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            output = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            tokens = (sum(len(c.tokens) for c in output if isinstance(c, Completion)) if isinstance(output, list)
                      else args.batch * args.new_tokens)
            print(f"{name:<14} batch {args.batch}: {elapsed:.2f} s, {tokens / elapsed:,.0f} tokens/s, "
                  f"{elapsed / args.new_tokens * 1000:.1f} ms/step")


if __name__ == "__main__":
    main()
