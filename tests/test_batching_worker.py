"""Batching in a real worker: requests that wait together run together, yet each message keeps its own
result, failure, seed and task events."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from producer.client import Client, Handle
from producer.errors import InputTooLarge, UnknownModel
from tests.conftest import TaskEvents, WorkerProcess

pytestmark = pytest.mark.integration


def status(client: Client, worker: WorkerProcess) -> dict[str, Any]:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5.0, destination=[worker.node])
    return dict(replies[0][worker.node])


def batched_requests(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    """Requests that ran in batches of more than one, between two status reads."""
    grown = 0
    for size, n in after["batch_sizes"].get(key, {}).items():
        if int(size) > 1:
            grown += (n - before["batch_sizes"].get(key, {}).get(size, 0)) * int(size)
    return grown


def test_a_burst_is_batched_and_every_request_gets_its_own_vectors(client: Client, worker: WorkerProcess) -> None:
    texts = [f"sentence {i} about {'cats' if i % 2 else 'markets'} and {'x' * (i % 7)}" for i in range(48)]
    alone = {text: client.embed([text])["embeddings"][0] for text in texts[:6]}
    before = status(client, worker)
    handles = [client.submit_embed([text]) for text in texts]
    results = [handle.get() for handle in handles]
    after = status(client, worker)
    assert batched_requests(before, after, "embed/minilm") > 0
    for text, result in zip(texts, results, strict=True):
        assert len(result["embeddings"]) == 1
        if text in alone:  # batched with others, padded, sorted: still the same vector
            assert torch.allclose(torch.tensor(result["embeddings"][0]), torch.tensor(alone[text]), atol=1e-5)


def test_bad_requests_fail_alone_among_good_ones(client: Client, worker: WorkerProcess) -> None:
    handles: list[tuple[str, Handle[Any]]] = []
    for i in range(30):
        if i % 10 == 3:
            handles.append(("too-long", client.submit_embed(["short", "word " * 400])))
        elif i % 10 == 7:
            handles.append(("unknown", client.submit_embed(["x"], model="ghost")))
        else:
            handles.append(("ok", client.submit_embed([f"good request {i}"])))
    for expected, handle in handles:
        if expected == "ok":
            assert handle.get()["dim"] == 384
        else:
            with pytest.raises(InputTooLarge if expected == "too-long" else UnknownModel):
                handle.get()


def test_generation_in_a_batch_comes_out_as_if_alone(client: Client, worker: WorkerProcess) -> None:
    seeded: dict[str, Any] = {"prompt": "The weather today is", "max_new_tokens": 12, "temperature": 0.9,
                              "top_p": 0.9, "seed": 42}
    greedy: dict[str, Any] = {"prompt": "The capital of France is", "max_new_tokens": 12}
    alone_seeded = client.generate(**seeded)
    alone_greedy = client.generate(**greedy)
    before = status(client, worker)
    mates = [client.submit_generate(f"Item {i}: once upon a time", max_new_tokens=8 + i,
                                    temperature=0.7 * (i % 2), seed=i) for i in range(6)]
    in_batch_seeded = client.submit_generate(**seeded)
    in_batch_greedy = client.submit_generate(**greedy)
    more = [client.submit_generate(f"Another {i}", max_new_tokens=5, stop=["."]) for i in range(4)]
    assert in_batch_seeded.get() == alone_seeded
    assert in_batch_greedy.get() == alone_greedy
    for handle in mates + more:
        assert handle.get()["completion_tokens"] >= 1
    assert batched_requests(before, status(client, worker), "generate/smollm2") > 0


def test_task_events_are_sent_for_every_message_of_a_batch(client: Client, worker: WorkerProcess) -> None:
    events = TaskEvents(client)  # returns once it listens: events go to whoever listens at that moment
    try:
        handles = [client.submit_embed([f"event {i}"]) for i in range(24)]
        for handle in handles:
            handle.get()
        deadline = time.monotonic() + 20
        while any(not events.answered_by(h.id) for h in handles) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {h.id: len(events.answered_by(h.id)) for h in handles} == {h.id: 1 for h in handles}
    finally:
        events.close()


def test_zero_shot_label_vectors_are_computed_once_and_counted(client: Client, worker: WorkerProcess) -> None:
    labels = ["astronomy", "gardening", "opera"]
    first = client.classify(["The telescope found a new comet."], labels=labels, top_k=3)
    before = status(client, worker)["counts"]
    again = client.classify(["The telescope found a new comet.", "Prune the roses in spring."], labels=labels)
    after = status(client, worker)["counts"]
    # the worker exports texts beside requests: two texts went to the device, the labels came from the cache
    assert after["embed/minilm:texts"] - before["embed/minilm:texts"] == 2
    assert after["embed/minilm:requests"] - before["embed/minilm:requests"] == 1
    assert again["results"][0][0]["label"] == first["results"][0][0]["label"]
    assert abs(again["results"][0][0]["score"] - first["results"][0][0]["score"]) < 1e-5
    assert again["results"][1][0]["label"] == "gardening"
