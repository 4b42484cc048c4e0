"""Bad input at scale: malformed payloads sent by task name, as a foreign client would, mixed with good
requests. Every bad one gets a typed error with a message, every good one its right answer, and the worker
neither crashes nor restarts.

1,000 payloads here (10 Hypothesis examples of 100, sent concurrently); `bash benchmarks/drills.sh` sends
10,000 (INFERQ_DRILL_FUZZ_EXAMPLES=100) and records the figures.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from producer.errors import TASK_ERRORS
from tests.conftest import REDIS_URL, WorkerProcess
from tests.test_foreign_clients import stored

pytestmark = pytest.mark.integration
KINDS = ("embed", "classify", "generate")
PER_EXAMPLE = 100
EXAMPLES = int(os.environ.get("INFERQ_DRILL_FUZZ_EXAMPLES", "10"))

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "\udc80\udc80"]),  # lone surrogates: JSON carries them, UTF-8 cannot
    st.just("x" * 2500), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                max_size=2),
)
text = st.one_of(st.text(max_size=60), st.just(""), st.just("x" * 2001), st.just("\x00\ud800\udfff"), junk)
texts = st.one_of(st.lists(text, min_size=0, max_size=20), junk, st.lists(st.lists(st.text(max_size=5)), max_size=2))
small_numbers = st.sampled_from([-1, 0, 1, 2, 4, 10**9, 2.5, "5", None, math.nan, math.inf, True])
model = st.sampled_from(["minilm", "tiny-sentiment", "tiny-lm", "smollm2", "../etc/passwd", "gpt2", "", 7])
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "root", 3]),
                                 "content": text})
messages = st.one_of(st.lists(message, max_size=3), junk, st.lists(junk, max_size=2))


def kwargs_for(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    common: dict[str, st.SearchStrategy[Any]] = {"model": model, "surprise": junk}
    if kind == "embed":
        fields = {"texts": texts, "normalize": st.one_of(st.booleans(), junk), **common}
    elif kind == "classify":
        fields = {"texts": texts, "labels": st.one_of(st.lists(text, max_size=5), junk), "top_k": small_numbers,
                  **common}
    else:
        # mostly the tiny LM: a valid request for SmolLM2 costs seconds of CPU; the rest of model's draws
        # still reach it, and an absent model (its default) is covered by the other tests
        common["model"] = st.one_of(st.just("tiny-lm"), st.just("tiny-lm"), model)
        fields = {"prompt": st.one_of(text, st.just("word " * 3000)), "messages": messages,
                  "max_new_tokens": small_numbers, "temperature": small_numbers, "top_p": small_numbers,
                  "stop": st.one_of(st.lists(text, max_size=5), junk), "seed": small_numbers, **common}
    # any subset of the fields: missing required ones, unknown ones, conflicting ones
    if kind == "generate":
        required = {"model": fields.pop("model")}
        return st.fixed_dictionaries(required, optional=fields)
    return st.fixed_dictionaries({}, optional=fields)


payload = st.sampled_from(KINDS).flatmap(lambda kind: st.tuples(st.just(kind), kwargs_for(kind)))
TALLY: Counter[str] = Counter()  # outcomes over every example, printed by the last test
GOOD: list[tuple[str, dict[str, Any]]] = [
    ("embed", {"texts": ["a good request", "and another"]}),
    ("classify", {"texts": ["The striker scored."], "labels": ["sports", "cooking"]}),
    ("generate", {"prompt": "Hello", "max_new_tokens": 4, "model": "tiny-lm", "seed": 1, "temperature": 0.7}),
]


def same_answer(kind: str, got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal, but for the last bits of floats, which vary with the padding of the batch a request ran in."""
    if kind == "embed":
        return bool(got["embeddings"] == [pytest.approx(row, abs=1e-5) for row in want["embeddings"]])
    if kind == "classify":
        return [[r["label"] for r in row] for row in got["results"]] == \
            [[r["label"] for r in row] for row in want["results"]]
    return got == want  # seeded generation is the same text batched or alone


@pytest.fixture(scope="module")
def sender() -> Any:
    app = Celery("fuzzer", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def reference(sender: Celery, worker: WorkerProcess) -> list[Any]:
    return [sender.send_task(f"inferq.{kind}", kwargs=kwargs, queue=kind).get(timeout=120) for kind, kwargs in GOOD]


# no shrinking: each example is a whole batch, and the assertion names the offending payload already
@fuzz_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(payloads=st.lists(payload, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_every_malformed_payload_gets_a_typed_error_and_good_ones_their_answer(
        payloads: list[tuple[str, dict[str, Any]]], sender: Celery, reference: list[Any],
        redis_client: redis.Redis, worker: WorkerProcess) -> None:
    mixed = [(kind, kwargs, None) for kind, kwargs in payloads] + \
            [(kind, kwargs, answer) for (kind, kwargs), answer in zip(GOOD, reference, strict=True)]
    sent = [(sender.send_task(f"inferq.{kind}", kwargs=kwargs, queue=kind).id, kind, kwargs, answer)
            for kind, kwargs, answer in mixed]
    for task_id, kind, kwargs, answer in sent:
        meta = stored(redis_client, task_id, timeout=120)
        TALLY["good sent" if answer is not None else "fuzzed sent"] += 1
        TALLY[meta["result"]["exc_type"] if meta["status"] == "FAILURE" else "SUCCESS"] += 1
        if answer is not None:
            assert meta["status"] == "SUCCESS", (kind, kwargs, meta)
            assert same_answer(kind, meta["result"], answer), (kind, kwargs, meta)
        elif meta["status"] == "FAILURE":
            failure = meta["result"]
            assert failure["exc_type"] in TASK_ERRORS, (kind, kwargs, failure)
            assert isinstance(failure["exc_message"], str) and failure["exc_message"], (kind, kwargs, failure)
        else:  # the fuzzer can draw a valid request too: then it must have the contract's shape
            assert meta["status"] == "SUCCESS", meta
            assert {"embed": "embeddings", "classify": "results", "generate": "text"}[kind] in meta["result"]
    assert worker.process.poll() is None, worker.log()[-3000:]


def test_the_fuzzed_worker_never_restarted_or_reloaded(sender: Celery, worker: WorkerProcess) -> None:
    replies = sender.control.broadcast("inferq_status", reply=True, timeout=5, destination=[worker.node])
    status = replies[0][worker.node]
    assert status["pid"] == worker.process.pid
    assert all(count == 1 for count in status["load_counts"].values()), status["load_counts"]
    print(f"\nfuzz: {dict(sorted(TALLY.items()))}; worker pid unchanged, models loaded once; "
          f"refused messages {status['refused']}")
