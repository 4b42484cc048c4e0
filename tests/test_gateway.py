"""The OpenAI gateway, used as its users use it: the official `openai` SDK (and raw HTTP for the event
stream) against a real `inferq gateway` process, in front of the session's real worker and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from producer.client import Client
from producer.contract import queue_keys
from producer.errors import (
    Cancelled,
    InferqConnectionError,
    InvalidInput,
    OutOfMemory,
    PoisonMessage,
    ResultTimeout,
    TaskTimeout,
)
from producer.gateway.admission import Admission, QueueFull, StreamsFull, StreamSlots
from producer.gateway.app import ClientGone, from_failure, from_task_error, still_runs
from producer.gateway.results import ResultWaiter
from producer.settings import Settings
from tests.conftest import (
    ARTIFACTS,
    REDIS_HOST,
    ROOT,
    Gateway,
    WorkerProcess,
    device_counts,
    free_port,
    start_redis_server,
    stop,
    worker_env,
)

pytestmark = pytest.mark.integration
KEY = "sk-test-0123456789"
CHAT = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture(scope="module")
def gateway(config_path: Path, worker: WorkerProcess) -> Iterator[Gateway]:
    started = Gateway(config_path, ARTIFACTS / "gateway-open.log", "--open")
    yield started
    started.stop()


def test_embeddings_are_the_vectors_the_queue_gives(gateway: Gateway, client: Client) -> None:
    texts = ["the gateway speaks OpenAI", "and puts every request on the queue"]
    direct = client.embed(texts)["embeddings"]
    sdk = gateway.sdk()
    for response in (sdk.embeddings.create(model="minilm", input=texts),  # the SDK asks for base64
                     sdk.embeddings.create(model="minilm", input=texts, encoding_format="float")):
        assert [item.index for item in response.data] == [0, 1]
        for item, vector in zip(response.data, direct, strict=True):
            assert len(item.embedding) == len(vector) == 384
            assert max(abs(a - b) for a, b in zip(item.embedding, vector, strict=True)) < 1e-5
        assert response.model == "minilm" and response.usage.prompt_tokens > len(texts)
    single = sdk.embeddings.create(model="minilm", input="one text", encoding_format="float")
    assert len(single.data) == 1


def test_chat_completions_give_the_queues_greedy_text_streamed_or_not(gateway: Gateway, client: Client) -> None:
    direct = client.generate(messages=CHAT, max_new_tokens=24)
    sdk = gateway.sdk()
    response = sdk.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct["text"]
    assert choice.finish_reason == direct["finish_reason"]
    assert response.usage is not None and response.usage.completion_tokens == direct["completion_tokens"]
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    chunks = list(sdk.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([piece for piece in pieces if piece]) > 1, "the text came in one piece"
    assert "".join(pieces) == direct["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == direct["finish_reason"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct["completion_tokens"]
    assert {chunk.model for chunk in chunks} == {"smollm2"}
    # fields given as null mean their defaults, and the no-op values of refused fields pass
    nulls = sdk.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0, top_p=None,
                                        n=None, stream=None, tool_choice="none",
                                        response_format={"type": "text"})
    assert nulls.choices[0].message.content == direct["text"]


def test_a_chat_without_max_tokens_runs_to_what_the_context_leaves(gateway: Gateway) -> None:
    """OpenAI's chat without max_tokens generates up to the context's end: a prompt near smollm2's 2,048 tokens
    (less than the worker's 256-token limit left) is answered, not refused."""
    sdk = gateway.sdk()
    long = [{"role": "user", "content": " ".join(["red green blue"] * 124)}] * 5  # 2,000 characters a message
    prompt_tokens = sdk.chat.completions.create(model="smollm2", messages=long, max_tokens=1,
                                                temperature=0).usage.prompt_tokens
    room = 2048 - prompt_tokens
    assert 0 < room < 256, prompt_tokens
    with pytest.raises(openai.BadRequestError, match="accepts at most 2048 tokens"):
        sdk.chat.completions.create(model="smollm2", messages=long, max_tokens=room + 1)
    response = sdk.chat.completions.create(model="smollm2", messages=long, temperature=0)
    choice, usage = response.choices[0], response.usage
    assert usage is not None and usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == room if choice.finish_reason == "length" else usage.completion_tokens < room


def test_completions_take_a_plain_prompt(gateway: Gateway, client: Client) -> None:
    direct = client.generate("1, 2, 3, 4,", max_new_tokens=12)
    sdk = gateway.sdk()
    response = sdk.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert response.choices[0].text == direct["text"] and response.object == "text_completion"
    streamed = sdk.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                      stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == direct["text"]


def test_responses_give_the_queues_greedy_text_streamed_or_not(gateway: Gateway, client: Client) -> None:
    """OpenAI's Responses API through the official SDK: instructions and input are the chat's system and user
    messages, and the answer is the queue's own, as a response object or as its typed events in order."""
    direct = client.generate(messages=[{"role": "system", "content": "Be brief."}, *CHAT], max_new_tokens=24)
    status = "incomplete" if direct["finish_reason"] == "length" else "completed"
    sdk = gateway.sdk()
    asked = {"model": "smollm2", "max_output_tokens": 24, "temperature": 0}
    response = sdk.responses.create(instructions="Be brief.", input=CHAT[0]["content"], **asked)
    assert response.output_text == direct["text"] and response.status == status
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "smollm2"
    assert (response.incomplete_details is not None) == (status == "incomplete")
    assert response.usage is not None and response.usage.input_tokens == direct["prompt_tokens"]
    assert response.usage.output_tokens == direct["completion_tokens"]
    # the same conversation as items, with text parts, the developer role, and nulls meaning their defaults
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
             {"type": "message", "role": "user", "content": CHAT[0]["content"]}]
    assert sdk.responses.create(input=items, top_p=None, store=False, tool_choice="none", **asked
                                ).output_text == direct["text"]

    events = list(sdk.responses.create(instructions="Be brief.", input=CHAT[0]["content"], stream=True, **asked))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{status}"], kinds
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == direct["text"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    last = events[-1].response  # type: ignore[union-attr]
    assert last.output_text == direct["text"] and last.usage is not None
    assert last.usage.output_tokens == direct["completion_tokens"] and last.id == events[0].response.id  # type: ignore[union-attr]
    # the SDK's own stream helper checks that every event names the same response and item
    with sdk.responses.stream(instructions="Be brief.", input=CHAT[0]["content"], **asked) as helper:
        assert "".join(event.delta for event in helper if event.type == "response.output_text.delta") == direct["text"]

    # a previous response's output replayed as input, as OpenAI's docs show a conversation kept by the client
    follow = sdk.responses.create(input=[*items, *[item.model_dump() for item in response.output],
                                         {"role": "user", "content": "And back down?"}], **asked)
    assert follow.output_text and follow.usage is not None
    assert follow.usage.input_tokens > response.usage.input_tokens

    for refused, name in ((dict(previous_response_id=response.id), "previous_response_id"),
                          (dict(tools=[{"type": "function", "name": "f", "parameters": {}}]), "tools"),
                          (dict(reasoning={"effort": "low"}), "reasoning")):
        with pytest.raises(openai.BadRequestError, match=name):
            sdk.responses.create(input="hi", **refused, **asked)  # type: ignore[call-overload]
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    with pytest.raises(openai.BadRequestError, match="input_image"):
        sdk.responses.create(input=image, **asked)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="function_call_output"):
        sdk.responses.create(input=[{"type": "function_call_output", "call_id": "c", "output": "4"}], **asked)
    for malformed in ({"role": ["user"], "content": "x"}, {"role": "user", "content": [{"type": {}, "text": "x"}]}):
        with pytest.raises(openai.BadRequestError):  # refused by name, not a 500
            sdk.post("/responses", body={"input": [malformed], **asked}, cast_to=object)
    assert sdk.responses.create(input=[{"type": None, "role": "user", "content": "hi"}], **asked).output_text


def test_a_streamed_response_cancelled_mid_way_ends_with_response_failed(gateway: Gateway, client: Client) -> None:
    """Read as raw server-sent events: each names its type on an event line, as OpenAI's do, and a generation
    that fails mid-stream ends it with response.failed carrying the error."""
    body = {"model": "smollm2", "input": "1, 2, 3, 4,", "max_output_tokens": 256, "temperature": 0, "stream": True}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{gateway.url}/v1/responses", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        named = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                named = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                assert events[-1]["type"] == named
                if [event["type"] for event in events].count("response.output_text.delta") == 2:
                    client.cancel(events[-1]["item_id"].removeprefix("msg_"))
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed", events[-3:]
    error = failed["response"]["error"]
    assert error["code"] == "server_error" and error["type"] == "Cancelled" and "cancel" in error["message"]
    assert failed["response"]["id"] == events[0]["response"]["id"]
    sent = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    (message,) = failed["response"]["output"]  # what was sent stays, an incomplete message
    assert message["status"] == "incomplete" and message["content"][0]["text"] == sent
    assert openai.types.responses.ResponseFailedEvent.model_validate(failed)  # as strictly as the SDK types it


def test_every_response_names_its_task_in_x_request_id(gateway: Gateway, client: Client) -> None:
    """As OpenAI's responses do (the SDK's _request_id, and its errors' request_id); here the task's id, so
    that a request can be followed to its task, and a fresh id where none was sent."""
    sdk = gateway.sdk()
    raw = sdk.embeddings.with_raw_response.create(model="minilm", input=["hello"], encoding_format="float")
    task_id = raw.headers["x-request-id"]
    vector = client.handle(task_id).get(timeout=10)["embeddings"][0]
    assert raw.parse().data[0].embedding == pytest.approx(vector, abs=1e-6) and raw.parse()._request_id == task_id
    with sdk.chat.completions.with_streaming_response.create(model="smollm2", messages=CHAT, max_tokens=2,
                                                             stream=True) as streamed:
        chunks = list(streamed.parse())
        assert chunks[0].id == "chatcmpl-" + streamed.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as refused:  # refused before anything was sent
        sdk.embeddings.create(model="minilm", input=[[1, 2]])
    assert refused.value.request_id is not None and refused.value.request_id.startswith("req_")


def test_models_lists_the_aliases_the_workers_serve(gateway: Gateway) -> None:
    listed = {model.id for model in gateway.sdk().models.list()}
    assert {"minilm", "smollm2", "tiny-lm", "tiny-sentiment"} <= listed
    assert gateway.sdk().models.retrieve("smollm2").id == "smollm2"  # what frameworks ask to check a name
    with pytest.raises(openai.NotFoundError, match="no live worker serves a model named 'nope'") as missing:
        gateway.sdk().models.retrieve("nope")
    assert missing.value.code == "model_not_found"


def test_bad_input_and_unknown_models_are_openai_errors_with_our_message(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    with pytest.raises(openai.BadRequestError, match="n: only 1 completion"):
        sdk.chat.completions.create(model="smollm2", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError, match="stream_options: only allowed with stream"):
        sdk.chat.completions.create(model="smollm2", messages=CHAT, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="messages must"):
        sdk.chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(openai.BadRequestError, match="token ids are not accepted"):
        sdk.embeddings.create(model="minilm", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="tools: not supported"):
        sdk.chat.completions.create(model="smollm2", messages=CHAT,
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    # a field that is not OpenAI's, or one OpenAI has that would change the answer, is refused by name, not
    # ignored; one that changes nothing passes
    with pytest.raises(openai.BadRequestError, match=r"unrecognized field.*'top_k'"):
        sdk.chat.completions.create(model="smollm2", messages=CHAT, extra_body={"top_k": 5})
    with pytest.raises(openai.BadRequestError, match=r"unrecognized field.*'normalize'"):
        sdk.embeddings.create(model="minilm", input="x", extra_body={"normalize": False})
    assert sdk.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1, user="u1",
                                       metadata={"team": "a"}).choices[0].finish_reason == "length"
    # JSON's own types: no true as a temperature, no "0.5" as a number, no 5.0 as a token count
    for wrong in ({"temperature": True}, {"top_p": "0.5"}, {"max_tokens": 5.0}, {"stream": "yes"}):
        with pytest.raises(openai.BadRequestError, match=next(iter(wrong))):
            sdk.post("/chat/completions", body={"model": "smollm2", "messages": CHAT, **wrong}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[0\]\.text must be a string"):
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": [
            {"type": "text", "text": None}]}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]: 'tool_calls' not supported"):
        sdk.post("/chat/completions", cast_to=object, body={"model": "smollm2", "messages": [
            {"role": "user", "content": "hi", "name": "bob"},  # a name is taken (and not shown to the model)
            {"role": "assistant", "content": "", "refusal": None, "tool_calls": [{"id": "call_1"}]}]})
    with pytest.raises(openai.NotFoundError, match="nope") as missing:
        sdk.embeddings.create(model="nope", input="x")
    assert missing.value.code == "model_not_found"
    raw = httpx.post(f"{gateway.url}/v1/embeddings", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    # a large body of wrong items: the first problems, not one per item (that answer was 40 times the body)
    many = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "minilm", "input": [1, "a"] * 50_000},
                      timeout=60)
    assert many.status_code == 400 and len(many.content) < 4096, len(many.content)
    assert "more problem(s)" in many.json()["error"]["message"]
    # open on loopback: what a cross-site page could send (a form post, a rebound host name) is refused
    form = httpx.post(f"{gateway.url}/v1/embeddings", content=b'{"input": "x", "model": "minilm"}', timeout=10,
                      headers={"content-type": "text/plain"})
    assert form.status_code == 415
    rebound = httpx.post(f"{gateway.url}/v1/embeddings", json={"input": "x", "model": "minilm"}, timeout=10,
                         headers={"host": "attacker.example"})
    assert rebound.status_code == 400 and rebound.headers["x-should-retry"] == "false"
    assert rebound.json()["error"]["code"] == "invalid_host", rebound.text  # OpenAI's shape, not plain text
    port = gateway.url.rsplit(":", 1)[1]
    for loopback in (f"[::1]:{port}", f"localhost:{port}", "127.0.0.1"):
        allowed = httpx.post(f"{gateway.url}/v1/embeddings", json={"input": "x", "model": "minilm"}, timeout=30,
                             headers={"host": loopback})
        assert allowed.status_code == 200, (loopback, allowed.text)
    # an error before the first token of a stream still gets its own status
    with pytest.raises(openai.NotFoundError):
        list(sdk.chat.completions.create(model="nope", messages=CHAT, stream=True))


def _stream_events(raw: bytes) -> list[dict[str, Any]]:
    """A chat completion's server-sent events, as bytes on the wire: every event a data line, the last [DONE]."""
    events = [event for event in raw.split(b"\n\n") if event]
    assert all(event.startswith(b"data: ") for event in events), raw[:500]
    assert events[-1] == b"data: [DONE]", raw[-200:]
    payloads = [json.loads(event[len(b"data: "):]) for event in events[:-1]]
    assert {payload["object"] for payload in payloads} == {"chat.completion.chunk"}
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return payloads


def _streamed_text(payloads: list[dict[str, Any]]) -> str:
    return "".join(payload["choices"][0]["delta"].get("content") or "" for payload in payloads)


def test_the_event_stream_as_raw_bytes(gateway: Gateway) -> None:
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    payloads = _stream_events(raw)
    # the README's curl -N line (no buffering: each event as it comes), read as raw bytes: the same events
    curl = subprocess.run(["curl", "-sS", "-N", f"{gateway.url}/v1/chat/completions",
                           "-H", "content-type: application/json", "-d", json.dumps(body)],
                          capture_output=True, timeout=60, check=True)
    from_curl = _stream_events(curl.stdout)
    assert _streamed_text(from_curl) == _streamed_text(payloads) != ""  # greedy: the same text


def test_a_client_that_goes_away_mid_stream_cancels_its_generation(gateway: Gateway, client: Client,
                                                                   worker: WorkerProcess) -> None:
    before = device_counts(client, worker).get("generate/smollm2:cancelled", 0)
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip((line for line in lines if line.startswith("data: ")), range(3),
                                            strict=False)]
    assert len(received) == 3  # then the connection closed, mid-stream
    deadline = time.monotonic() + 20
    while device_counts(client, worker).get("generate/smollm2:cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.2)


def test_a_client_that_gives_up_on_a_plain_generation_cancels_it(gateway: Gateway, client: Client,
                                                                  worker: WorkerProcess) -> None:
    """The SDK's own timeout (and its retries after it) must not leave generations running for nobody."""
    before = device_counts(client, worker).get("generate/smollm2:cancelled", 0)
    body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # 256 tokens take SmolLM2 far longer than 1.5 s on a CPU
        httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.5))
    deadline = time.monotonic() + 20
    while device_counts(client, worker).get("generate/smollm2:cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.2)
    page = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'route="/v1/completions",status="499"' in page


def test_a_gateway_stopped_mid_stream_closes_it_within_its_grace_and_cancels_the_generation(
        config_path: Path, client: Client, worker: WorkerProcess) -> None:
    """A rolling deploy's SIGTERM: the stream still open near the end of INFERQ_GATEWAY__SHUTDOWN_GRACE_S ends
    with an error event saying so and its generation is stopped, rather than being cut by the SIGKILL that
    follows with the generation left running (or cancelled by uvicorn, which logged a traceback each)."""
    stopping = Gateway(config_path, ARTIFACTS / "gateway-stopping.log", "--open", INFERQ_GATEWAY__SHUTDOWN_GRACE_S="1")
    try:
        before = device_counts(client, worker).get("generate/smollm2:cancelled", 0)
        body = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{stopping.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert [line for line, _ in zip((line for line in lines if line.startswith("data: ")), range(2),
                                            strict=False)]
            stopping.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]  # it ends within the gateway's grace
            assert time.monotonic() - started < 10
        # 256 tokens take SmolLM2 longer than 1 s on a CPU: the stream ended on the gateway's word, not its own
        assert rest[-1] == "data: [DONE]" and "the gateway is stopping" in rest[-2], rest[-3:]
        assert stopping.process.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "Exception in ASGI application" not in (ARTIFACTS / "gateway-stopping.log").read_text()
        deadline = time.monotonic() + 20
        while device_counts(client, worker).get("generate/smollm2:cancelled", 0) == before:
            assert time.monotonic() < deadline, "the generation of the closed stream was not cancelled"
            time.sleep(0.2)
    finally:
        stopping.stop()


def test_streams_past_the_gateways_limit_are_refused_with_429_and_their_slots_come_back(
        config_path: Path, worker: WorkerProcess) -> None:
    """Each open stream holds a Redis connection: past INFERQ_GATEWAY__MAX_STREAMS a stream is refused (and a
    plain request still served), and a slot is free again once its stream ends, however it ends."""
    capped = Gateway(config_path, ARTIFACTS / "gateway-capped.log", "--open", INFERQ_GATEWAY__MAX_STREAMS="1",
                     INFERQ_GATEWAY__RETRY_AFTER_S="2")
    long = {"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0, "stream": True}
    short = {**long, "max_tokens": 4}

    def streams_open() -> str:
        page = httpx.get(f"{capped.url}/metrics", timeout=10).text
        return next(line for line in page.splitlines() if line.startswith("inferq_gateway_streams_open "))

    try:
        with httpx.stream("POST", f"{capped.url}/v1/completions", json=long, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert streams_open() == "inferq_gateway_streams_open 1.0"
            with pytest.raises(openai.RateLimitError, match="holds 1 streams open") as refused:
                capped.sdk().completions.create(**short)
            assert refused.value.response.headers["retry-after"] == "2"
            assert refused.value.code == "too_many_streams"
            plain = capped.sdk().completions.create(**{**short, "stream": False})
            assert plain.choices[0].text
        deadline = time.monotonic() + 20  # the client went away: its slot comes back as its stream is cancelled
        while streams_open() != "inferq_gateway_streams_open 0.0":
            assert time.monotonic() < deadline, streams_open()
            time.sleep(0.1)
        for _ in range(2):  # a stream run to its end gives its slot back too
            text = "".join(chunk.choices[0].text for chunk in capped.sdk().completions.create(**short))
            assert text
        assert streams_open() == "inferq_gateway_streams_open 0.0"
    finally:
        capped.stop()


def test_a_stream_slot_comes_back_when_its_stream_is_collected_and_a_release_counts_once() -> None:
    """A response whose client left before its body was iterated never runs the body's cleanup: its slot
    comes back when the stream it was tied to is collected."""

    class Stream:
        pass

    slots = StreamSlots(2, retry_after=1)
    stream = Stream()
    slots.tie(stream, slots.take())
    other = slots.take()
    with pytest.raises(StreamsFull):
        slots.take()
    del stream
    assert slots.open == 1
    other()
    other()
    assert slots.open == 0
    unbounded = StreamSlots(None, retry_after=1)
    for _ in range(3):
        unbounded.take()
    assert unbounded.open == 3


def test_api_keys_are_required_when_set_and_the_gateway_never_runs_open_without_being_told(
        config_path: Path, worker: WorkerProcess) -> None:
    metrics_port = free_port()
    keyed = Gateway(config_path, ARTIFACTS / "gateway-keyed.log",
                    INFERQ_GATEWAY__API_KEYS=json.dumps({"webapp": KEY}), INFERQ_GATEWAY__MAX_BODY_MB="0.01",
                    INFERQ_GATEWAY__METRICS_PORT=str(metrics_port))
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.sdk("sk-wrong").models.list()
        assert {model.id for model in keyed.sdk(KEY).models.list()} >= {"minilm"}
        assert httpx.get(f"{keyed.url}/metrics", timeout=10).status_code == 401
        page = httpx.get(f"{keyed.url}/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=10).text
        assert 'inferq_gateway_requests_total{key="webapp",route="/v1/models",status="200"} 1.0' in page
        assert 'inferq_gateway_requests_total{key="none",route="/v1/models",status="401"} 1.0' in page
        assert 'inferq_gateway_errors_total{route="/v1/models",type="invalid_api_key"} 1.0' in page
        assert KEY not in page
        # the same metrics on INFERQ_GATEWAY__METRICS_PORT, for a Prometheus that holds no key
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert 'inferq_gateway_requests_total{key="webapp",route="/v1/models",status="200"} 1.0' in scraped.text
        assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200  # a load balancer needs no key
        # a body over INFERQ_GATEWAY__MAX_BODY_MB (here 10 KiB): 413, whether its length is declared or not
        big = json.dumps({"model": "minilm", "input": ["x" * 20_000]}).encode()
        authorized = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        declared = httpx.post(f"{keyed.url}/v1/embeddings", content=big, headers=authorized, timeout=30)
        assert declared.status_code == 413 and "MAX_BODY_MB" in declared.json()["error"]["message"]
        chunked = httpx.post(f"{keyed.url}/v1/embeddings", headers=authorized, timeout=30,
                             content=(big[at:at + 4096] for at in range(0, len(big), 4096)))
        assert chunked.status_code == 413
        assert httpx.post(f"{keyed.url}/v1/embeddings", json={"model": "minilm", "input": "small"},
                          headers=authorized, timeout=30).status_code == 200
    finally:
        keyed.stop()
    assert KEY not in (ARTIFACTS / "gateway-keyed.log").read_text()
    with pytest.raises(httpx.TransportError):  # stopped with the gateway
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
    refused = subprocess.run([sys.executable, "-m", "producer.cli", "gateway", "--port", str(free_port())],
                             env=worker_env(config_path), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no API keys are set" in refused.stderr
    exposed = subprocess.run([sys.executable, "-m", "producer.cli", "gateway", "--open", "--host", "0.0.0.0",
                              "--port", str(free_port())],
                             env=worker_env(config_path), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert exposed.returncode == 2 and "only on loopback" in exposed.stderr


def test_errors_a_retry_cannot_mend_tell_the_sdk_not_to_retry() -> None:
    for error, status in ((TaskTimeout("late"), 504), (ResultTimeout("late"), 504), (Cancelled("gone"), 409),
                          (PoisonMessage("poison"), 500)):
        response = from_task_error(error).response()
        assert response.status_code == status and response.headers["x-should-retry"] == "false", error
    assert from_task_error(OutOfMemory("too big")).status == 400  # too big even alone: bad input for this device
    away = from_task_error(InferqConnectionError("redis away")).response()  # a retry may well succeed
    assert away.status_code == 503 and "x-should-retry" not in away.headers
    # once the request was sent, Redis lost is a 503 not to retry: the task is queued and may still run
    sent = from_failure(InferqConnectionError("redis away")).response()
    assert sent.status_code == 503 and sent.headers["x-should-retry"] == "false"
    assert b"may still run" in sent.body
    # a task that failed with an error not inferq's (Celery rebuilds a worker's RuntimeError as one) is the
    # task's failure, not the gateway's, and a retry would run it again
    failed = from_failure(RuntimeError("CUDA error: an illegal memory access"))
    assert failed.status == 500 and not failed.retry and str(failed).startswith("the task failed: RuntimeError")
    assert not still_runs(Cancelled("x")) and still_runs(ResultTimeout("x")) and still_runs(ClientGone())
    # what the gateway's handlers see is the converted error: it still says whether the task may run on
    assert still_runs(from_failure(ResultTimeout("x"))) and still_runs(from_failure(InferqConnectionError("x")))
    assert not still_runs(from_failure(Cancelled("x"))) and not still_runs(failed)


def test_classify_health_and_metrics(gateway: Gateway, client: Client, worker: WorkerProcess) -> None:
    texts = ["what a wonderful day", "the match ended in a draw"]
    direct = client.classify(texts, labels=["weather", "sports"], top_k=2)
    answer = httpx.post(f"{gateway.url}/v1/classify", json={"input": texts, "labels": ["weather", "sports"],
                                                           "top_k": 2}, timeout=60).json()
    assert answer["object"] == "list" and answer["model"] == direct["model"]
    assert [row["index"] for row in answer["data"]] == [0, 1]
    for row, labels in zip(answer["data"], direct["results"], strict=True):
        assert [x["label"] for x in row["labels"]] == [x["label"] for x in labels]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(row["labels"], labels, strict=True)) < 1e-5
    own = httpx.post(f"{gateway.url}/v1/classify", json={"input": "great", "model": "tiny-sentiment"},
                     timeout=60).json()
    assert own["model"] == "tiny-sentiment" and len(own["data"]) == 1
    bad = httpx.post(f"{gateway.url}/v1/classify", json={"input": ["x"], "labels": []}, timeout=60)
    assert bad.status_code == 400 and "labels" in bad.json()["error"]["message"]
    health = httpx.get(f"{gateway.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert any(w["node"] == worker.node and w["ok"] for w in health.json()["workers"])
    page = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'inferq_gateway_requests_total{key="open",route="/v1/classify",status="200"} 2.0' in page
    assert 'inferq_gateway_errors_total{route="/v1/classify",type="InvalidInput"} 1.0' in page
    assert 'inferq_gateway_request_seconds_count{route="/v1/classify"} 3.0' in page
    assert 'inferq_gateway_in_flight{route="/metrics"} 1.0' in page  # this request itself


def test_a_full_queue_is_refused_with_429_and_an_unserved_kind_with_503_and_nothing_is_sent(
        tmp_path: Path, config_path: Path) -> None:
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)  # no worker reads this one
    url = f"redis://{REDIS_HOST}:{port}/0"
    full = None
    try:
        store.lpush("embed", *[b"{}"] * 3)  # three interactive messages waiting: one over the limit
        store.lpush(queue_keys("generate")[-1], *[b"{}"] * 50)  # bulk work: it makes nobody wait, and counts not
        full = Gateway(config_path, tmp_path / "gateway.log", "--open", INFERQ_REDIS_URL=url,
                       INFERQ_GATEWAY__MAX_QUEUE_DEPTH="2", INFERQ_GATEWAY__RETRY_AFTER_S="3")
        with pytest.raises(openai.RateLimitError, match="the embed queue holds 3 messages waiting") as refused:
            full.sdk().embeddings.create(model="minilm", input="hello")
        assert refused.value.response.headers["retry-after"] == "3"
        assert store.llen("embed") == 3  # refused before sending: a retry leaves no duplicate behind
        with pytest.raises(openai.InternalServerError, match="no live worker serves generate") as unserved:
            full.sdk().completions.create(model="smollm2", prompt="hello")  # no worker reads this Redis
        assert unserved.value.status_code == 503 and store.llen("generate") == 0
        page = httpx.get(f"{full.url}/metrics", timeout=10).text
        assert 'inferq_gateway_admission_refused_total{kind="embed"} 1.0' in page
    finally:
        if full is not None:
            full.stop()
        stop(server, 10)


def test_flex_requests_wait_in_the_bulk_lane_and_are_answered_as_flex(tmp_path: Path, config_path: Path) -> None:
    """OpenAI's service_tier "flex" (slower processing, for work nobody waits on) is inferq's bulk lane: its
    messages wait in Redis behind every interactive one. A worker stopped with SIGSTOP still counts as serving
    for a while, and takes nothing meanwhile, so what each request left in Redis can be read."""
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)
    url = f"redis://{REDIS_HOST}:{port}/0"
    worker = WorkerProcess(worker_env(config_path, url), ARTIFACTS / "gateway-flex-worker.log",
                           f"flex-{os.getpid()}@localhost", ("--kinds", "embed,generate"))
    client = Client(Settings(redis_url=url, result_timeout=60))
    flex = None
    try:
        worker.wait_ready(client)
        flex = Gateway(config_path, tmp_path / "gateway.log", "--open", INFERQ_REDIS_URL=url)
        sdk = flex.sdk()
        answered: Any = sdk.post("/completions", cast_to=object, body={"model": "tiny-lm", "prompt": "hi",
                                                                      "max_tokens": 2, "service_tier": "flex"})
        assert answered["service_tier"] == "flex" and answered["choices"][0]["text"] is not None
        assert sdk.embeddings.create(model="minilm", input="hi", extra_body={"service_tier": "flex"}).data
        for tier in ("auto", "priority", "fast"):  # OpenAI's other tiers (it adds some now and then): interactive
            assert sdk.embeddings.create(model="minilm", input="hi", extra_body={"service_tier": tier}).data
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            bodies = [("/v1/embeddings", {"model": "minilm", "input": "later", "service_tier": "flex"}),
                      ("/v1/embeddings", {"model": "minilm", "input": "now"}),
                      ("/v1/completions", {"model": "tiny-lm", "prompt": "later", "max_tokens": 2, "stream": True,
                                           "service_tier": "flex"})]
            for route, body in bodies:  # nobody answers: each is given up once sent
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{flex.url}{route}", json=body, timeout=httpx.Timeout(10, read=1.5))
            lengths = {kind: [store.llen(key) for key in queue_keys(kind)] for kind in ("embed", "generate")}
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
        assert lengths == {"embed": [1, 0, 0, 1], "generate": [0, 0, 0, 1]}, lengths
    finally:
        if flex is not None:
            flex.stop()
        client.close()
        worker.stop()
        stop(server, 10)


async def _admit_all(admission: Admission, kinds: list[str], lane: str = "interactive") -> list[str]:
    outcomes = []
    for kind in kinds:
        try:
            await admission.admit(kind, lane)  # type: ignore[arg-type]
            outcomes.append("admitted")
        except QueueFull as exc:
            outcomes.append(f"full: {exc}" if lane == "bulk" else "full")
    await admission.close()
    return outcomes


def test_admission_counts_each_requests_own_lane_and_reads_it_once_per_window(tmp_path: Path) -> None:
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)
    url = f"redis://{REDIS_HOST}:{port}/0"
    try:
        store.lpush(queue_keys("embed")[-1], *[b"{}"] * 10)  # bulk
        store.lpush("classify", *[b"{}"] * 2)
        admission = Admission(url, limit=1, cache_s=60.0, retry_after=1, connect_timeout=2.0)
        before = store.info("commandstats").get("cmdstat_llen", {}).get("calls", 0)
        assert asyncio.run(_admit_all(admission, ["embed", "classify", "embed", "classify"])) == [
            "admitted", "full", "admitted", "full"]
        assert store.info("commandstats")["cmdstat_llen"]["calls"] - before == 2  # one read per kind
        assert asyncio.run(_admit_all(Admission(url, limit=None, cache_s=0, retry_after=1, connect_timeout=2.0),
                                      ["classify"])) == ["admitted"]
        # a flex request rides the bulk lane: its own list bounds it (nothing else does), not the interactive one
        flex = asyncio.run(_admit_all(Admission(url, limit=1, cache_s=0, retry_after=1, connect_timeout=2.0),
                                      ["embed", "classify"], lane="bulk"))
        assert flex == ["full: the embed bulk queue holds 10 messages waiting, over this gateway's limit of 1; "
                        "retry after 1 s", "admitted"]
    finally:
        stop(server, 10)


async def _waits(client: Client) -> None:
    backend = client.app.backend
    store = redis.Redis.from_url(client.settings.backend)
    waiter = ResultWaiter(backend, client.settings.backend, 2.0)

    def stored(task_id: str, status: str, result: Any) -> tuple[str, bytes]:
        meta = {"status": status, "result": result, "task_id": task_id, "traceback": None, "children": []}
        return backend.get_key_for_task(task_id).decode(), backend.encode(meta)

    ids = [f"waiter-test-{i}" for i in range(5)]
    try:
        key, value = stored(ids[0], "SUCCESS", {"answer": 0})  # landed before anyone waited
        store.set(key, value)
        assert await waiter.wait(ids[0], 5) == {"answer": 0}

        async def publish_later() -> None:
            await asyncio.sleep(0.2)
            key, value = stored(ids[1], "SUCCESS", {"answer": 1})
            store.set(key, value)
            store.publish(key, value)  # as the worker does

        started = time.monotonic()
        answer, _ = await asyncio.gather(waiter.wait(ids[1], 5), publish_later())
        assert answer == {"answer": 1} and time.monotonic() - started < 1.5  # told, not swept (every 3 s here)

        async def store_without_telling() -> None:  # a publish lost while the connection was away
            await asyncio.sleep(0.2)
            key, value = stored(ids[2], "SUCCESS", {"answer": 2})
            store.set(key, value)

        answer, _ = await asyncio.gather(waiter.wait(ids[2], 10), store_without_telling())
        assert answer == {"answer": 2}  # the sweep read it

        failure = {"exc_type": "InvalidInput", "exc_module": "producer.errors", "exc_message": "texts: bad"}
        key, value = stored(ids[3], "FAILURE", failure)
        store.set(key, value)
        with pytest.raises(InvalidInput, match="texts: bad"):
            await waiter.wait(ids[3], 5)
        with pytest.raises(ResultTimeout, match=r"within 0\.3 s"):
            await waiter.wait(ids[4], 0.3)
        assert not waiter._waiting  # every request left, subscriptions dropped
    finally:
        store.delete(*[backend.get_key_for_task(task_id) for task_id in ids])
        await waiter.close()
        store.close()


def test_the_result_waiter_is_told_reads_what_landed_first_and_sweeps_what_it_missed(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.gateway import results

    monkeypatch.setattr(results, "SWEEP_S", 3.0)  # 1 s by default: an answer told is one well before a sweep
    asyncio.run(_waits(client))
