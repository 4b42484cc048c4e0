"""Text generation with any AutoModelForCausalLM: prompts or chat messages, greedy or sampled, stop strings."""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from producer.contract import GenerateRequest, GenerateResult
from producer.errors import InputTooLarge, InvalidInput
from producer.settings import ModelEntry
from workers.models.loading import LoadedModel, load_model


class CausalGenerator:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        tokenizer, config = loaded.tokenizer, loaded.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self._eos: set[int] = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        self._pad = int(pad)

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device) -> CausalGenerator:
        return cls(load_model("generate", alias, entry, AutoModelForCausalLM, device))

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if request.messages is None:
            assert request.prompt is not None  # the contract guarantees exactly one of the two
            return list(tokenizer(request.prompt)["input_ids"])
        if not tokenizer.chat_template:
            raise InvalidInput(f"model {self.loaded.alias!r} has no chat template; send prompt instead of "
                               "messages")
        chat = [message.model_dump() for message in request.messages]
        rendered: Any = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)
        return list(rendered["input_ids"])

    def generate(self, request: GenerateRequest) -> GenerateResult:
        prompt = self.prompt_ids(request)
        limit = self.loaded.entry.max_length
        if len(prompt) + request.max_new_tokens > limit:
            raise InputTooLarge(
                f"the prompt is {len(prompt)} tokens and max_new_tokens is {request.max_new_tokens}; model "
                f"{self.loaded.alias!r} accepts at most {limit} tokens in all"
            )
        if request.seed is not None:
            # The device thread runs one request at a time, so seeding the global generator is exact.
            torch.manual_seed(request.seed)
        input_ids = torch.tensor([prompt], device=self.loaded.device)
        output = self.loaded.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=self._config(request),
            tokenizer=self.loaded.tokenizer if request.stop else None,
        )
        completion = output[0, len(prompt):].tolist()
        return self._result(request, prompt, completion)

    def _config(self, request: GenerateRequest) -> GenerationConfig:
        options: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "pad_token_id": self._pad,
            "eos_token_id": sorted(self._eos) or None,
        }
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        else:
            options.update(do_sample=False)
        if request.stop:
            options["stop_strings"] = list(request.stop)
        return GenerationConfig(**options)  # type: ignore[no-untyped-call]

    def _result(self, request: GenerateRequest, prompt: list[int], completion: list[int]) -> GenerateResult:
        # generate() pads finished rows; the completion ends at the first end-of-sequence token.
        ended_by_eos = False
        for position, token in enumerate(completion):
            if token in self._eos:
                completion, ended_by_eos = completion[: position + 1], True
                break
        text = str(self.loaded.tokenizer.decode(completion, skip_special_tokens=True))
        cut = min((i for i in (text.find(stop) for stop in request.stop or []) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        finish: Literal["stop", "length"] = "stop" if ended_by_eos or cut >= 0 else "length"
        return GenerateResult(model=self.loaded.alias, text=text, finish_reason=finish,
                              prompt_tokens=len(prompt), completion_tokens=len(completion))
