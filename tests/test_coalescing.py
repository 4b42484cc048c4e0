"""Producer-side coalescing: concurrent calls share messages, yet each caller gets exactly its own answer."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import torch

from producer.client import Client, FutureHandle
from producer.coalesce import split_result
from producer.contract import queue_name
from producer.errors import InferqConnectionError, InputTooLarge, ResultTimeout, UnknownModel
from producer.settings import Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, WorkerProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coalescing(settings: Settings, worker: WorkerProcess) -> Iterator[Client]:
    client = Client(settings.model_copy(update={"coalesce_ms": 20.0}))
    yield client
    client.close()


def requests_seen(client: Client, worker: WorkerProcess) -> int:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=5.0, destination=[worker.node])
    return int(replies[0][worker.node]["counts"].get("embed/minilm:requests", 0))


def test_concurrent_calls_share_messages_and_get_their_own_rows(coalescing: Client, client: Client,
                                                                 worker: WorkerProcess) -> None:
    texts = [f"coalesced sentence number {i}" for i in range(40)]
    alone = {text: client.embed([text]) for text in texts[:5]}
    before = requests_seen(client, worker)
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda text: coalescing.embed([text]), texts))
    messages = requests_seen(client, worker) - before
    assert messages < 20, f"{messages} messages for 40 calls: nothing was coalesced"
    for text, result in zip(texts, results, strict=True):
        assert len(result["embeddings"]) == 1
        if text in alone:
            own = alone[text]
            assert torch.allclose(torch.tensor(result["embeddings"][0]), torch.tensor(own["embeddings"][0]),
                                  atol=1e-5)
            # its own token count, not the merged message's (which the gateway reported as usage 0 before)
            assert result["prompt_tokens"] == own["prompt_tokens"] > 0 and result["text_tokens"] == own["text_tokens"]


def test_a_merged_result_gives_each_caller_its_own_token_count_where_the_worker_sent_them() -> None:
    merged = {"model": "m", "dim": 1, "embeddings": [[1.0], [2.0], [3.0]], "prompt_tokens": 12,
              "text_tokens": [3, 4, 5]}
    first, second = split_result("embed", merged, [1, 2])
    assert (first["prompt_tokens"], first["text_tokens"]) == (3, [3])
    assert (second["prompt_tokens"], second["text_tokens"], second["embeddings"]) == (9, [4, 5], [[2.0], [3.0]])
    older = {key: value for key, value in merged.items() if key != "text_tokens"}  # a worker before the field
    assert all("prompt_tokens" not in part for part in split_result("embed", older, [1, 2]))
    assert split_result("embed", older, [3]) == [older]  # one caller's texts alone: the whole count is its own
    # counts that do not match the rows are left out; the vectors still reach their callers
    parts = split_result("embed", {**merged, "text_tokens": [3, 4]}, [1, 2])
    assert [part["embeddings"] for part in parts] == [[[1.0]], [[2.0], [3.0]]]
    assert all("prompt_tokens" not in part and "text_tokens" not in part for part in parts)


def test_a_bad_call_fails_alone_inside_a_merged_message(coalescing: Client, worker: WorkerProcess) -> None:
    def call(i: int) -> Any:
        try:
            return coalescing.embed(["word " * 400] if i == 5 else [f"fine {i}", f"also fine {i}"])
        except InputTooLarge as exc:
            return exc

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(call, range(12)))
    assert isinstance(outcomes[5], InputTooLarge)
    assert "texts[0] is" in str(outcomes[5])  # numbered within its own request, not the merged one
    assert all(len(o["embeddings"]) == 2 for i, o in enumerate(outcomes) if i != 5)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return [s["label"] for s in a["results"][0]] == [s["label"] for s in b["results"][0]] and all(
        abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a["results"][0], b["results"][0], strict=True))


def test_asyncio_callers_and_different_options_are_kept_apart(coalescing: Client, client: Client,
                                                               worker: WorkerProcess) -> None:
    first = [([f"The striker scored goal {i}."], {"labels": ["sports", "cooking"]}) for i in range(8)]
    second = [([f"Bake the bread {i}."], {"labels": ["cooking", "finance"], "top_k": 2}) for i in range(4)]

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(coalescing.aclassify(texts, **options) for texts, options in first + second),
            coalescing.aembed(["unnormalised"], normalize=False),
        )

    results = asyncio.run(many())
    for (texts, options), result in zip(first + second, results, strict=False):
        assert same(result, client.classify(texts, **options))  # as if sent alone, whoever shared its message
    assert all(len(r["results"][0]) == 1 for r in results[:8])
    assert all(len(r["results"][0]) == 2 for r in results[8:12])
    vector = torch.tensor(results[12]["embeddings"][0])
    assert abs(float(vector.norm()) - 1.0) > 1e-3


def test_an_answer_stored_without_a_notice_is_still_read() -> None:
    """The coalescer is told of answers by Redis pub/sub; one stored with no notice (published before the
    subscription took effect, or while Redis restarted) is found by its once-a-second read of the keys."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"  # no worker listens here: this test plays the worker
    store = redis.Redis.from_url(url)
    store.flushdb()
    client = Client(Settings(redis_url=url, coalesce_ms=5.0))
    try:
        handle = client.submit("embed", texts=["a", "b"])
        deadline = time.monotonic() + 10
        raw = None
        while raw is None and time.monotonic() < deadline:
            raw = store.rpop(queue_name("embed"))
            time.sleep(0.01)
        assert raw is not None, "the coalescer sent nothing"
        task_id = json.loads(raw)["headers"]["id"]
        answer = {"model": "minilm", "dim": 1, "embeddings": [[1.0], [2.0]]}
        store.set(f"celery-task-meta-{task_id}", json.dumps({"status": "SUCCESS", "result": answer,
                                                             "traceback": None, "task_id": task_id}))  # no PUBLISH
        assert handle.get(timeout=5) == answer
    finally:
        client.close()
        store.flushdb()


def _queued(store: redis.Redis, count: int, timeout: float = 10) -> None:
    """Until the coalescer has sent ``count`` messages that nobody took yet."""
    deadline = time.monotonic() + timeout
    while store.llen(queue_name("embed")) < count:
        assert time.monotonic() < deadline, f"the coalescer sent {store.llen(queue_name('embed'))} of {count}"
        time.sleep(0.01)


def _play_worker(store: redis.Redis, answers: list[dict[str, Any]], timeout: float = 10) -> list[str]:
    """Take the coalescer's messages off the queue, as many as answers, and store each answer under its task
    id (with the PUBLISH a worker sends): the task ids, in order."""
    task_ids: list[str] = []
    deadline = time.monotonic() + timeout
    while len(task_ids) < len(answers):
        raw = store.rpop(queue_name("embed"))
        if raw is None:
            assert time.monotonic() < deadline, f"the coalescer sent {len(task_ids)} of {len(answers)} messages"
            time.sleep(0.01)
            continue
        task_ids.append(json.loads(raw)["headers"]["id"])
    for task_id, answer in zip(task_ids, answers, strict=True):
        meta = json.dumps({"status": "SUCCESS", "result": answer, "traceback": None, "task_id": task_id})
        store.set(f"celery-task-meta-{task_id}", meta)
        store.publish(f"celery-task-meta-{task_id}", meta)
    return task_ids


@contextmanager
def playing_the_worker(coalesce_ms: float) -> Iterator[tuple[redis.Redis, Client]]:
    """A coalescing client on a database no worker listens to (the test plays the worker), emptied after."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"
    store = redis.Redis.from_url(url)
    store.flushdb()
    client = Client(Settings(redis_url=url, coalesce_ms=coalesce_ms))
    try:
        yield store, client
    finally:
        client.close()
        store.flushdb()
        store.close()


def test_a_caller_that_gives_up_takes_nothing_from_its_neighbours_nor_the_coalescer() -> None:
    """An asyncio caller's timeout cancels what it awaits: that cancelled the future its whole merged group
    was answered on, so setting the answer raised in the coalescer's thread, its neighbours were never
    answered, and a broker error at that moment ended the thread for every later call of the process."""
    with playing_the_worker(200.0) as (store, client):
        first = client.submit("embed", texts=["alone"])  # nothing in flight: it goes out at once
        _queued(store, 1)
        impatient = client.submit("embed", texts=["a"])  # these two ride in one message, 200 ms later
        patient = client.submit("embed", texts=["b"])
        with pytest.raises(ResultTimeout):
            asyncio.run(impatient.wait(0.01))
        _play_worker(store, [{"model": "m", "dim": 1, "embeddings": [[0.0]]},
                             {"model": "m", "dim": 1, "embeddings": [[1.0], [2.0]]}])
        assert first.get(timeout=5)["embeddings"] == [[0.0]]
        assert patient.get(timeout=5)["embeddings"] == [[2.0]]
        assert impatient.get(timeout=5)["embeddings"] == [[1.0]]  # the handle that timed out stays valid
        assert asyncio.run(impatient.wait(5))["embeddings"] == [[1.0]]
        # a merged answer that does not split fails its callers, each with the error, and the thread goes on
        broken = client.submit("embed", texts=["x", "y"])
        _play_worker(store, [{"model": "m", "dim": 1, "embeddings": [[1.0]]}])
        with pytest.raises(RuntimeError, match="has 1 rows for 2 texts"):
            broken.get(timeout=5)
        after = client.submit("embed", texts=["still served"])
        _play_worker(store, [{"model": "m", "dim": 1, "embeddings": [[3.0]]}])
        assert after.get(timeout=5)["embeddings"] == [[3.0]]


def test_a_closed_client_fails_what_is_still_in_flight_and_its_thread_ends() -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"  # no worker listens here: nothing is ever answered
    store = redis.Redis.from_url(url)
    store.flushdb()
    client = Client(Settings(redis_url=url, coalesce_ms=5.0))
    try:
        unanswered = client.submit("embed", texts=["nobody answers this"])
        _queued(store, 1)
        client.close()  # after its grace for the answers in flight
        with pytest.raises(ResultTimeout, match="the client was closed"):
            unanswered.get(timeout=1)
        assert client._coalescer is not None and not client._coalescer._thread.is_alive()
    finally:
        store.flushdb()
        store.close()


def test_an_error_shared_by_a_merged_messages_callers_is_not_sent_again_one_by_one(
        coalescing: Client, client: Client) -> None:
    """An unknown model fails every text alike: sent again per caller, 30 calls cost 30 more messages (and a
    merged message that timed out under overload came back as hundreds)."""
    store = client.app.backend.client
    before = len(store.keys("celery-task-meta-*"))

    def call(i: int) -> Any:
        try:
            return coalescing.submit("embed", texts=(f"text {i}",), model="no-such-model").get(timeout=60)
        except UnknownModel as exc:
            return exc

    with ThreadPoolExecutor(max_workers=30) as pool:
        outcomes = list(pool.map(call, range(30)))
    assert all(isinstance(outcome, UnknownModel) for outcome in outcomes), outcomes
    messages = len(store.keys("celery-task-meta-*")) - before
    assert messages < 15, f"{messages} messages for 30 calls: the merged ones were sent again one by one"


def test_a_closed_client_still_sends_alone_and_a_failed_send_leaves_no_subscription() -> None:
    """After close(), a coalescing client sends as a plain one does (it raised a bare RuntimeError); and a
    send that failed leaves no subscription to a channel no answer will come on."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"
    store = redis.Redis.from_url(url)
    store.flushdb()
    client = Client(Settings(redis_url=url, coalesce_ms=5.0))
    try:
        client.close()
        handle = client.submit("embed", texts=["sent after close"])
        assert not isinstance(handle, FutureHandle)
        _queued(store, 1)
    finally:
        store.flushdb()
        store.close()
    results = redis.Redis.from_url(url)
    subscribed_before = set(results.pubsub_channels("celery-task-meta-*"))
    offline = Client(Settings(redis_url=url, broker_url=f"redis://{REDIS_HOST}:{free_port()}/0", coalesce_ms=5.0,
                              connect_timeout=0.5))
    try:
        for _ in range(3):
            with pytest.raises(InferqConnectionError):
                offline.embed(["the broker is away"])
        deadline = time.monotonic() + 10
        while (left := set(results.pubsub_channels("celery-task-meta-*")) - subscribed_before) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"{len(left)} subscriptions left by failed sends"
    finally:
        offline.close()
        results.close()


def test_a_merged_message_that_ran_past_its_limit_goes_again_in_halves() -> None:
    """The merge may have made it too long to run, so it is not failed whole; but sent again one caller per
    message, a timeout on an overloaded device came back as hundreds of messages."""
    with playing_the_worker(200.0) as (store, client):
        first = client.submit("embed", texts=["alone"])  # nothing in flight: it goes out at once
        _queued(store, 1)
        calls = [client.submit("embed", texts=[f"t{i}"]) for i in range(4)]  # one message, 200 ms later
        _play_worker(store, [{"model": "m", "dim": 1, "embeddings": [[0.0]]}])
        assert first.get(timeout=5)["embeddings"] == [[0.0]]
        _queued(store, 1)
        merged = json.loads(store.rpop(queue_name("embed")) or b"null")
        assert merged["headers"]["id"] and json.loads(base64.b64decode(merged["body"]))[1]["texts"] == \
            ["t0", "t1", "t2", "t3"]
        timed_out = json.dumps({"status": "FAILURE", "traceback": None, "task_id": merged["headers"]["id"],
                                "result": {"exc_type": "TaskTimeout", "exc_module": "producer.errors",
                                           "exc_message": "the embed request ran past its limit of 30 s"}})
        store.set(f"celery-task-meta-{merged['headers']['id']}", timed_out)
        store.publish(f"celery-task-meta-{merged['headers']['id']}", timed_out)
        _queued(store, 2)
        bodies = [json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["texts"]
                  for raw in store.lrange(queue_name("embed"), 0, -1)]
        assert sorted(bodies) == [["t0", "t1"], ["t2", "t3"]]
        _play_worker(store, [{"model": "m", "dim": 1, "embeddings": [[float(text[-1])] for text in texts]}
                             for texts in reversed(bodies)])  # rpop takes the list's oldest first
        assert [call.get(timeout=5)["embeddings"] for call in calls] == [[[0.0]], [[1.0]], [[2.0]], [[3.0]]]
