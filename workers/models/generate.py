"""Text generation with any AutoModelForCausalLM: prompts or chat messages, greedy or sampled, stop strings.

Preparing (chat template, tokenising, limits) and finishing (decoding, stop strings) run in the task
threads; only the batch from ``start`` touches the device, a decoding step at a time for the whole batch.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM

from producer.contract import GenerateRequest, GenerateResult
from producer.errors import InputTooLarge, InvalidInput
from producer.settings import ModelEntry
from workers.models.decode import Decoding, Row
from workers.models.loading import LoadedModel, load_model


@dataclass
class Prepared:
    request: GenerateRequest
    prompt: list[int]
    max_new_tokens: int  # what the row may generate: the request's, or less where fit_new_tokens fitted it
    # An unseeded sampled request draws its seed from its task id where it has one: a message delivered again
    # (its worker died) samples the same text again, so its stream resumes where it stopped.
    task_id: str | None = None

    @property
    def total_tokens(self) -> int:
        return len(self.prompt) + self.max_new_tokens


@dataclass
class Completion:
    tokens: list[int]
    ended: bool  # by end-of-sequence or a stop string


class CausalGenerator:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        tokenizer, config = loaded.tokenizer, loaded.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self._eos: set[int] = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        self._pad = int(pad)
        special = {token.content: int(index) for index, token in tokenizer.added_tokens_decoder.items()
                   if token.special and token.content}
        # Special tokens asked for as stop strings end the row as its end token does: the text is decoded
        # without them, so as strings they would never match ("<|endoftext|>" on a raw completion, say).
        self._special_ids = special
        # The chat template's own control tokens as text ("<|im_start|>", ...): the rendered chat is tokenised
        # whole, so one written inside a message would become the real token and forge another turn. Only
        # those the template writes: a model's other special tokens ("<filename>") are ordinary words in a chat.
        self._control = _template_tokens(tokenizer, special)
        # truncate = true: a prompt keeps its end, cut in prepare to leave room for max_new_tokens; the
        # tokenizer's own truncation would keep its start, and to max_length, leaving no room at all
        loaded.encoder.no_truncation()

    @classmethod
    def load(cls, alias: str, entry: ModelEntry, device: torch.device, weights: bool = True,
             dense: bool = False) -> CausalGenerator:
        return cls(load_model("generate", alias, entry, AutoModelForCausalLM, device, weights, dense))

    # --- task thread ----------------------------------------------------------------------------------

    def prepare(self, request: GenerateRequest, task_id: str | None = None) -> Prepared:
        """Render and tokenise the prompt and check it fits. Thread-safe."""
        tokenizer, encoder = self.loaded.tokenizer, self.loaded.encoder
        if request.messages is None:
            assert request.prompt is not None  # the contract guarantees exactly one of the two
            prompt = encoder.encode(request.prompt).ids
        else:
            if not tokenizer.chat_template:
                raise InvalidInput(f"model {self.loaded.alias!r} has no chat template; send prompt instead of "
                                   "messages")
            for index, message in enumerate(request.messages):
                forged = next((token for token in self._control if token in message.content), None)
                if forged is not None:
                    raise InvalidInput(f"messages[{index}].content holds {forged!r}, a control token of model "
                                       f"{self.loaded.alias!r}; a message may not write one")
            chat = [message.model_dump() for message in request.messages]
            rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            prompt = encoder.encode(str(rendered), add_special_tokens=False).ids
        limit = self.loaded.entry.max_length
        new_tokens = request.max_new_tokens
        if request.fit_new_tokens and len(prompt) < limit:
            new_tokens = min(new_tokens, limit - len(prompt))
        room = limit - new_tokens
        if len(prompt) > room and self.loaded.entry.truncate and room >= 2:
            # the end of the prompt, what the continuation follows; a leading BOS stays where it was
            bos = prompt[:1] if prompt[0] == tokenizer.bos_token_id else []
            prompt = bos + prompt[len(prompt) - room + len(bos):]
        if len(prompt) + new_tokens > limit:
            raise InputTooLarge(
                f"the prompt is {len(prompt)} tokens and max_new_tokens is {new_tokens}; model "
                f"{self.loaded.alias!r} accepts at most {limit} tokens in all"
            )
        return Prepared(request, prompt, new_tokens, task_id)

    def finish(self, prepared: Prepared, completion: Completion) -> GenerateResult:
        """Decode the completion and cut it before the first stop string. Thread-safe."""
        text = self._text(completion.tokens)
        cut = _first_stop(text, self._text_stops(prepared.request))
        if cut >= 0:
            text = text[:cut]
        finish: Literal["stop", "length"] = "stop" if completion.ended or cut >= 0 else "length"
        return GenerateResult(model=self.loaded.alias, text=text, finish_reason=finish,
                              prompt_tokens=len(prepared.prompt), completion_tokens=len(completion.tokens))

    def settled(self, prepared: Prepared, tokens: list[int]) -> str:
        """The text of a completion under way that can be shown now: what the final text will start with
        (see ``settled_text``). Thread-safe."""
        return settled_text(self._text(tokens), self._text_stops(prepared.request))

    def _text_stops(self, request: GenerateRequest) -> tuple[str, ...]:
        """The stop strings matched in the text (the special tokens among them end the row by their id)."""
        return tuple(stop for stop in request.stop or () if stop not in self._special_ids)

    # --- device thread --------------------------------------------------------------------------------

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one row holds: keys and values of every layer, in the model's dtype."""
        config = self.loaded.model.config
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = torch.finfo(self.loaded.model.dtype).bits // 8
        return int(2 * config.num_hidden_layers * kv_heads * head_dim * element)

    def start(self, batch: list[Prepared], prefill_chunk: int = 0) -> GenerationBatch:
        """The batch, ready to decode a step at a time; every row keeps its own settings and random generator.
        ``prefill_chunk``: padded prompt tokens a prefill pass may run (0: the whole prompts in one)."""
        rows = [self._row(prepared) for prepared in batch]
        return GenerationBatch(Decoding(self.loaded.model, rows, self._eos, self._pad, self.loaded.device,
                                        self._text, prefill_chunk))

    def run(self, batch: list[Prepared]) -> list[Completion | Exception]:
        """The whole batch to its end, in one call (the benchmarks' path; the device loop steps instead)."""
        generation = self.start(batch)
        finished: dict[int, Completion | Exception] = {}
        while not generation.done:
            finished.update(generation.step())
        return [finished[index] for index in range(len(batch))]

    def _row(self, prepared: Prepared) -> Row:
        request = prepared.request
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(request.seed if request.seed is not None else _seed_of(prepared.task_id))
        return Row(prompt=prepared.prompt, max_new_tokens=prepared.max_new_tokens, temperature=request.temperature,
                   top_p=request.top_p, generator=generator, stop=self._text_stops(request),
                   stop_ids=frozenset(self._special_ids[stop] for stop in request.stop or ()
                                      if stop in self._special_ids))

    def _text(self, tokens: list[int]) -> str:
        return str(self.loaded.encoder.decode(tokens, skip_special_tokens=True))


class GenerationBatch:
    """A generate batch on the device loop: each ``step()`` runs a chunk of the prompts' prefill or decodes one
    token for every live row, and returns the rows that finished, with their completions; ``stop(index)``
    drops a row whose caller gave up."""

    def __init__(self, decoding: Decoding) -> None:
        self.decoding = decoding

    @property
    def done(self) -> bool:
        return self.decoding.done

    @property
    def prefilling(self) -> bool:
        return self.decoding.prefilling

    def step(self, alone: bool = False) -> list[tuple[int, Completion | Exception]]:
        """``alone``: nothing else waits for the device: the rest of a chunked prefill runs in one pass. A row
        that failed alone (``Row.failed``) finishes with its error."""
        finished = [(index, _completion(self.decoding.row(index))) for index in self.decoding.step(alone)]
        for index, _ in finished:
            self.decoding.release(index)
        return finished

    def absorb(self, other: GenerationBatch) -> list[int] | None:
        """Take ``other``'s live rows into this batch (continuous batching); see ``Decoding.join``."""
        return self.decoding.join(other.decoding)

    def produced(self, index: int) -> list[int]:
        """The tokens a live row has decoded so far (what a streamed request publishes as they come)."""
        return self.decoding.row(index).completion

    def stop(self, index: int) -> int:
        """Drop a row; returns how many tokens it had decoded."""
        self.decoding.stop(index)
        decoded = len(self.decoding.row(index).completion)
        self.decoding.release(index)
        return decoded


def _template_tokens(tokenizer: Any, special: dict[str, int]) -> tuple[str, ...]:
    """The special tokens a model's chat template writes around the messages (none without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return ()
    rendered = ""
    for chat in ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}],
                 [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "v"}]):
        try:  # some templates refuse a system message, or any order but theirs
            rendered += str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        except Exception:  # the next sample chat may suit it
            continue
    return tuple(sorted(token for token in special if token in rendered))


def settled_text(text: str, stops: Sequence[str]) -> str:
    """What of a completion's text so far is final: cut before the first stop string, as ``finish`` cuts;
    without a trailing replacement character (the first bytes of a multi-byte character whose other bytes
    are still to come); and without any ending that could still grow into a stop string."""
    cut = _first_stop(text, stops)
    if cut >= 0:
        return text[:cut]
    text = text.rstrip("\ufffd")
    held = max((size for stop in stops for size in range(1, min(len(stop) - 1, len(text)) + 1)
                if text.endswith(stop[:size])), default=0)
    return text[:len(text) - held]


def _first_stop(text: str, stops: Sequence[str]) -> int:
    return min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=-1)


def _seed_of(task_id: str | None) -> int:
    if task_id is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.blake2b(task_id.encode(), digest_size=8).digest(), "big") >> 1


def _completion(row: Row) -> Completion | Exception:
    if row.failed is not None:
        return RuntimeError(row.failed)
    return Completion(row.completion, row.ended_by_token or row.ended_by_stop)
