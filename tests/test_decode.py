"""Continuous batching on a real (tiny, random-weight) causal LM: rows join a batch that is already decoding
and leave it as they finish, and each row's text is the one it gets alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from producer.contract import GenerateRequest
from producer.errors import InputTooLarge
from producer.settings import ModelEntry
from workers.models.decode import MIN_CHUNK_COLUMNS, Decoding, Row
from workers.models.generate import CausalGenerator, Completion, GenerationBatch


@pytest.fixture(scope="module")
def generator(tiny_models: dict[str, Path]) -> CausalGenerator:
    return CausalGenerator.load("tiny-lm", ModelEntry(source=str(tiny_models["lm"]), max_length=128),
                                torch.device("cpu"))


def start(generator: CausalGenerator, *requests: dict[str, Any]) -> GenerationBatch:
    return generator.start([generator.prepare(GenerateRequest(**request)) for request in requests])


def run(batch: GenerationBatch) -> dict[int, Completion]:
    done: dict[int, Completion] = {}
    while not batch.done:
        done.update(batch.step())
    return done


SEEDED = {"prompt": "once upon a time there was", "max_new_tokens": 30, "temperature": 0.9, "top_p": 0.9, "seed": 7}
GREEDY = {"prompt": "the capital of france is", "max_new_tokens": 40}


@torch.inference_mode()
def test_a_row_that_joins_a_changing_batch_decodes_as_it_does_alone(generator: CausalGenerator) -> None:
    alone_seeded = run(start(generator, SEEDED))[0]
    alone_greedy = run(start(generator, GREEDY))[0]
    busy = start(generator, GREEDY, {"prompt": "a much longer prompt " * 4, "max_new_tokens": 5})
    finished: dict[int, Completion] = {}
    for _ in range(3):  # the greedy row is three tokens in when the others join
        finished.update(busy.step())
    joining = start(generator, SEEDED, {"prompt": "short", "max_new_tokens": 2, "temperature": 0.5, "seed": 1})
    finished.update({index + 100: completion for index, completion in joining.step()})  # its prefill, alone
    indices = busy.absorb(joining)
    assert indices == [2, 3]
    assert busy.decoding.live_rows == 4  # the two joined ones beside two mid-way; then rows leave one by one
    finished.update(run(busy))
    assert finished[2] == alone_seeded  # same seed, same text, whatever the batch did around it
    assert finished[0] == alone_greedy
    assert len(finished[1].tokens) == 5 and len(finished[3].tokens) == 2


@torch.inference_mode()
def test_a_stopped_row_leaves_and_the_rest_decode_unchanged(generator: CausalGenerator) -> None:
    alone = run(start(generator, GREEDY))[0]
    batch = start(generator, {"prompt": "never finishes", "max_new_tokens": 60}, GREEDY)
    finished: dict[int, Completion] = {}
    for _ in range(4):
        finished.update(batch.step())
    assert batch.stop(0) == 4
    assert batch.decoding.live_rows == 1
    finished.update(run(batch))
    assert finished == {1: alone}


@torch.inference_mode()
def test_a_batch_that_lives_on_as_rows_join_and_leave_keeps_only_what_its_live_rows_need(
        generator: CausalGenerator) -> None:
    request = {"prompt": "short", "max_new_tokens": 15}
    alone = run(start(generator, request))[0]
    batch = start(generator, request)
    finished: dict[int, Completion] = dict(batch.step())
    joined: list[int] = []
    widths: list[int] = []
    for _ in range(12):  # a row joins every ten steps; each lives fifteen: the batch never empties
        for _ in range(10):
            finished.update(batch.step())
            widths.append(batch.decoding.width)
            assert len(batch.decoding.rows) == batch.decoding.live_rows  # nothing kept of the rows that left
        joining = start(generator, request)
        joining.step()
        indices = batch.absorb(joining)
        assert indices is not None
        joined += indices
    finished.update(run(batch))
    assert all(finished[index] == alone for index in [0, *joined])  # each row as alone
    # the mask and cache are as wide as the live rows need (prompt + 15), not as the batch's life (120 steps)
    prompt = len(generator.prepare(GenerateRequest(**request)).prompt)
    assert max(widths) <= prompt + 16, max(widths)


@torch.inference_mode()
def test_a_prefill_run_in_chunks_decodes_what_a_whole_one_does(generator: CausalGenerator) -> None:
    requests = [{"prompt": "a long prompt that takes several chunks to prefill " * 6, "max_new_tokens": 12},
                {"prompt": "short", "max_new_tokens": 12}, SEEDED]
    whole = run(start(generator, *requests))
    chunked = generator.start([generator.prepare(GenerateRequest(**request)) for request in requests], 12)
    finished: dict[int, Completion] = {}
    prefill_steps = 0
    while chunked.prefilling:
        assert all(chunked.produced(index) == [] for index in range(3))  # a chunk before the last decodes nothing
        finished.update(chunked.step())
        prefill_steps += 1
    longest = max(len(generator.prepare(GenerateRequest(**request)).prompt) for request in requests)
    # 12 tokens over 3 rows would be 4 prompt columns a chunk: at least MIN_CHUNK_COLUMNS
    assert prefill_steps == -(-longest // MIN_CHUNK_COLUMNS) > 2
    finished.update(run(chunked))
    assert finished == whole
    # with nothing else waiting for the device, the rest of the prefill runs in one pass
    alone = generator.start([generator.prepare(GenerateRequest(**request)) for request in requests], 12)
    alone.step()
    assert alone.prefilling
    first = dict(alone.step(alone=True))
    assert not alone.prefilling
    assert {**first, **run(alone)} == whole


@torch.inference_mode()
def test_the_cache_bytes_per_token_are_what_a_real_cache_holds(generator: CausalGenerator) -> None:
    batch = start(generator, GREEDY, {"prompt": "another prompt, longer than the first one", "max_new_tokens": 3})
    batch.step()
    cache = batch.decoding._cache
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)
    rows, _, tokens, _ = cache.layers[0].keys.shape
    assert held == rows * tokens * generator.cache_bytes_per_token


@torch.inference_mode()
def test_the_tiniest_temperature_and_top_p_the_contract_allows_sample_the_likeliest_token(
        generator: CausalGenerator) -> None:
    """Divided by 1e-45 the logits overflowed to inf (NaN probabilities), and a top_p of 5e-46 is 0 in float32
    (no token left): either made the sampler raise, and with it every request of its batch."""
    greedy = run(start(generator, GREEDY))[0]
    for extreme in ({"temperature": 1e-45}, {"temperature": 1e-300}, {"temperature": 5e-324},
                    {"temperature": 0.9, "top_p": 5e-46}, {"temperature": 1e-45, "top_p": 5e-46}):
        assert run(start(generator, {**GREEDY, **extreme, "seed": 3}))[0].tokens == greedy.tokens, extreme


def test_truncate_keeps_the_prompts_end_and_leaves_room_for_the_new_tokens(tiny_models: dict[str, Path]) -> None:
    entry = ModelEntry(source=str(tiny_models["lm"]), max_length=128, truncate=True)
    truncating = CausalGenerator.load("tiny-lm", entry, torch.device("cpu"), weights=False)
    whole = truncating.loaded.encoder.encode(" ".join(f"word{i}" for i in range(200))).ids
    prepared = truncating.prepare(GenerateRequest(prompt=" ".join(f"word{i}" for i in range(200)),
                                                  max_new_tokens=20))
    assert prepared.prompt == whole[-108:]  # 128 - 20: its end, where the continuation starts
    with pytest.raises(InputTooLarge, match="max_new_tokens is 128"):  # no room at all for the prompt
        truncating.prepare(GenerateRequest(prompt="word", max_new_tokens=128))


@torch.inference_mode()
def test_fit_new_tokens_generates_what_room_the_prompt_leaves_instead_of_refusing(
        generator: CausalGenerator) -> None:
    """What the gateway sends for a chat without max_tokens: OpenAI runs such a chat to the context's end."""
    long = " ".join(f"word{i}" for i in range(40))
    prompt = generator.loaded.encoder.encode(long).ids
    room = 128 - len(prompt)
    assert 0 < room < 64
    with pytest.raises(InputTooLarge, match="max_new_tokens is 64"):
        generator.prepare(GenerateRequest(prompt=long, max_new_tokens=64))
    prepared = generator.prepare(GenerateRequest(prompt=long, max_new_tokens=64, fit_new_tokens=True))
    assert prepared.prompt == prompt and prepared.max_new_tokens == room and prepared.total_tokens == 128
    (completion,) = run(generator.start([prepared])).values()
    assert len(completion.tokens) == room or completion.ended
    assert len(completion.tokens) <= room
    # a request that fits is not touched, and a prompt that fills the limit alone is still refused
    assert generator.prepare(GenerateRequest(prompt="hi", max_new_tokens=64, fit_new_tokens=True)).max_new_tokens == 64
    with pytest.raises(InputTooLarge):
        generator.prepare(GenerateRequest(prompt=" ".join(f"word{i}" for i in range(200)), fit_new_tokens=True))


@torch.inference_mode()
def test_a_special_token_asked_for_as_a_stop_string_ends_its_row_by_its_id(generator: CausalGenerator) -> None:
    """The text is decoded without special tokens: as a string such a stop could never match."""
    first = run(start(generator, GREEDY))[0].tokens[0]
    prepared = generator.prepare(GenerateRequest(**GREEDY, stop=["[SEP]", "never"]))
    row = generator._row(prepared)
    assert row.stop == ("never",) and row.stop_ids == {generator._special_ids["[SEP]"]}
    row.stop_ids = frozenset({first})  # as if the model's first token were the stop token
    batch = GenerationBatch(Decoding(generator.loaded.model, [row], generator._eos, generator._pad,
                                     torch.device("cpu"), generator._text))
    (completion,) = run(batch).values()
    assert completion.tokens == [first] and completion.ended


@torch.inference_mode()
def test_a_row_whose_scores_overflow_fails_alone_and_its_batch_mates_decode_as_they_do_alone(
        tiny_models: dict[str, Path], generator: CausalGenerator) -> None:
    """A float16 overflow gives a row scores that are not finite: the step raised for it, and every row of the
    batch started again from scratch (a streamed one's readers saw a restart) until it failed alone. Here one
    token's embedding is made infinite, so a prompt holding it overflows on a real model."""
    alone = run(start(generator, GREEDY))[0]
    alone_seeded = run(start(generator, SEEDED))[0]
    poisoned = CausalGenerator.load("tiny-lm", ModelEntry(source=str(tiny_models["lm"]), max_length=128),
                                    torch.device("cpu"))
    token = poisoned.loaded.tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    assert token not in poisoned.loaded.tokenizer(GREEDY["prompt"] + SEEDED["prompt"])["input_ids"]
    poisoned.loaded.model.get_input_embeddings().weight[token] = float("inf")
    finished = run(start(poisoned, GREEDY, {"prompt": "a zebra", "max_new_tokens": 10}, SEEDED))
    assert isinstance(finished[1], RuntimeError) and "not finite" in str(finished[1])
    assert finished[0] == alone and finished[2] == alone_seeded


@torch.inference_mode()
def test_a_stop_string_far_into_a_completion_ends_its_row_at_the_token_a_whole_decode_finds_it(
        generator: CausalGenerator) -> None:
    """Only the end of a row's text is decoded each step to look for its stops: the row must still end at the
    first token whose whole text holds one, however far in."""
    long = {"prompt": "the capital of france is", "max_new_tokens": 120}
    tokens = run(start(generator, long))[0].tokens
    assert len(tokens) == 120

    def first_holding(stop: str) -> int:
        return next(n for n in range(1, len(tokens) + 1) if stop in generator._text(tokens[:n]))

    text = generator._text(tokens)
    for at, size in ((len(text) * 3 // 4, 6), (len(text) // 2, 40)):  # far in; one longer than the window's start
        stop = text[at:at + size]
        row = run(start(generator, {**long, "stop": [stop]}))[0]
        assert len(row.tokens) == first_holding(stop) and row.ended, (stop, len(row.tokens))


def test_a_stop_ending_in_a_long_newest_token_is_found_though_that_token_fills_the_window() -> None:
    """Only the end of a row's text is decoded: a newest token long enough (a run of spaces in a code
    vocabulary) filled the window alone, and the stop before it was missed."""
    pieces = {index: letter for index, letter in enumerate("abcdefghijklm")} | {99: "n" + " " * 40}
    decoding = Decoding.__new__(Decoding)  # its stop check alone, over a vocabulary of these pieces
    decoding._text_of = lambda tokens: "".join(pieces[token] for token in tokens)
    row = Row(prompt=[0], max_new_tokens=100, stop=("abcdefghijklmn",), completion=[*range(13), 99])
    assert decoding._stopped(row)
