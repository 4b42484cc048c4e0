"""Load from foreign-style clients: producer processes that send one request per message by task name, keep a
window of requests in flight, and read results straight from Redis. A plain client sends with a plain
Celery app's ``send_task`` (about 0.45 ms of client CPU each); a raw client LPUSHes protocol-2 messages it
builds itself (``benchmarks/protocol.py``), a pipeline per window refill, as a lean foreign client would.

Each process owns ``window`` slots; a slot sends its next request as soon as its previous result lands,
so ``processes x window`` requests are in flight. Results are read as Celery's own result consumer reads
them, with no Celery machinery: the worker publishes each result on a channel named after its key as it
stores it, so a process subscribes to its requests' channels before sending them and is told when each
lands. Nothing polls: polling MGETs cost the producers, on the worker's two cores, 0.25 ms of CPU per request
under load (every 5 ms) and 4 ms per request at light load (every millisecond). Once a second a process
also reads the keys of what it still waits for, so a result published before its subscription took effect
is not missed. Results are decoded with orjson (12 us for an embedding, against 100 us for the json module),
as a lean client would.

With ``stream``, generate requests ask for a streamed text and are read as a foreign streaming client reads
them: one XREAD over every stream the process waits on, noting when each piece arrives; the stream's last
entry (end or error) is the answer, so nothing subscribes to result channels.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from celery import Celery

from benchmarks.protocol import task_message
from producer.app import make_celery
from producer.contract import queue_name, stream_key, task_name
from producer.settings import Kind, Settings

Payload = Callable[[int], dict[str, Any]]
# max_new_tokens of each generate request: one number, or a range (low, high) each request draws from
NewTokens = int | tuple[int, int]
SWEEP_SECONDS = 1.0  # how often a process reads the keys of what it still waits for
STREAM_QUIET_S = 10.0  # a streamed request silent this long is looked for in the stored results


def new_tokens_of(spec: NewTokens, i: int) -> int:
    """Request i's max_new_tokens: the number, or a draw from the range seeded by i (the same in every run, and
    for the raw reference)."""
    if isinstance(spec, int):
        return spec
    low, high = spec
    return random.Random(i).randint(low, high)


def parse_new_tokens(text: str) -> NewTokens:
    """"64" or "8-256"."""
    low, dash, high = text.partition("-")
    if not dash:
        return int(low)
    if not 1 <= int(low) <= int(high):
        raise ValueError(f"a range of new tokens is LOW-HIGH with 1 <= LOW <= HIGH; got {text!r}")
    return int(low), int(high)


def payload_for(kind: Kind, new_tokens: NewTokens, stream: bool = False) -> Payload:
    if kind == "embed":
        return lambda i: {"texts": [f"request {i}: a short sentence about queues, batching and GPUs"]}
    if kind == "classify":
        return lambda i: {"texts": [f"request {i}: the match ended in a late winner"],
                          "labels": ["sports", "finance", "cooking"]}
    extra = {"stream": True} if stream else {}
    return lambda i: {"prompt": f"Story {i}: once upon a time", "max_new_tokens": new_tokens_of(new_tokens, i),
                      **extra}


@dataclass
class Sample:
    sent: float  # time.time() at send
    done: float  # time.time() when the result was seen
    ok: bool
    tokens: int
    pieces: tuple[float, ...] = ()  # a streamed request: time.time() when each piece of its text arrived


def _producer(settings: Settings, kind: Kind, count: int, window: int, new_tokens: NewTokens, offset: int,
              start_at: float, out: Any, raw: bool = False, stream: bool = False) -> None:
    app: Celery = make_celery(settings.model_copy(update={"result_backend": "disabled://"}), "bench-producer")
    app.conf.result_backend = None
    store = redis.Redis.from_url(settings.backend)
    broker = redis.Redis.from_url(settings.broker) if raw else None
    stream = stream and kind == "generate"
    payload = payload_for(kind, new_tokens, stream)
    name, queue = task_name(kind), queue_name(kind)
    inflight: dict[str, float] = {}  # result key -> when its request was sent
    pieces: dict[str, list[float]] = {}  # result key -> when each piece of its streamed text arrived
    read_up_to: dict[str, bytes] = {}  # stream key -> the last entry id read
    samples: list[Sample] = []
    sent = 0

    def finished(key: str, ok: bool, tokens: int) -> None:
        samples.append(Sample(inflight.pop(key), time.time(), ok, tokens, tuple(pieces.pop(key, ()))))
        read_up_to.pop(stream_key(key.removeprefix("celery-task-meta-")), None)
        if len(samples) % 50 == 0:
            out.put(("tick", 50))

    def landed(key: str, raw: bytes | str) -> bool:
        """Records a final result; whether its channel can be left (answered now or before)."""
        meta = orjson.loads(raw)
        if key not in inflight:
            return True
        if meta.get("status") not in ("SUCCESS", "FAILURE"):
            return False
        ok = meta["status"] == "SUCCESS"
        finished(key, ok, int(meta["result"].get("completion_tokens", 0)) if ok else 0)
        return True

    def read_streams() -> None:
        """One XREAD over every stream still open: pieces timed as they arrive, a last entry is the answer."""
        reply: Any = store.xread(read_up_to, count=256, block=100)  # type: ignore[arg-type]
        now = time.time()
        for name_of_stream, entries in reply or ():
            key = "celery-task-meta-" + name_of_stream.decode().removeprefix(stream_key(""))
            read_up_to[name_of_stream.decode()] = entries[-1][0]
            for _, fields in entries:
                event = fields[b"event"]
                if event == b"text":
                    pieces.setdefault(key, []).append(now)
                elif event in (b"end", b"error") and key in inflight:
                    finished(key, event == b"end", int(fields.get(b"completion_tokens", 0)))

    while time.time() < start_at:
        time.sleep(0.001)
    cpu_at_start = time.process_time()
    last_sweep = time.monotonic()
    with app.producer_or_acquire() as producer, store.pubsub(ignore_subscribe_messages=True) as results:  # type: ignore[no-untyped-call, unused-ignore]
        while sent < count or inflight:
            fresh = [str(uuid.uuid4()) for _ in range(min(count - sent, window - len(inflight)))]
            if fresh:
                if stream:
                    read_up_to.update((stream_key(task_id), b"0-0") for task_id in fresh)
                else:
                    results.subscribe(*(f"celery-task-meta-{task_id}" for task_id in fresh))
                if broker is not None:  # one LPUSH for the whole refill
                    broker.lpush(queue, *(task_message(name, queue, payload(offset + sent + i), task_id)[1]
                                          for i, task_id in enumerate(fresh)))
                else:
                    for i, task_id in enumerate(fresh):
                        app.send_task(name, kwargs=payload(offset + sent + i), queue=queue, task_id=task_id,
                                      producer=producer)
                now = time.time()
                inflight.update((f"celery-task-meta-{task_id}", now) for task_id in fresh)
                sent += len(fresh)
            left: list[str] = []
            message = None
            if stream:
                read_streams()
            else:
                message = results.get_message(timeout=0.1)
            while message is not None:
                key = message["channel"].decode()
                if landed(key, message["data"]):
                    left.append(key)
                message = results.get_message(timeout=0.0)
            if time.monotonic() - last_sweep > SWEEP_SECONDS and inflight:
                last_sweep = time.monotonic()
                # a streamed request ends with its stream's last entry, which may come after its result is
                # stored: its result is read only once its stream has said nothing for a while
                quiet = time.time() - STREAM_QUIET_S
                keys = [key for key, sent_at in inflight.items()
                        if not stream or max(pieces.get(key, [sent_at])[-1], sent_at) < quiet]
                left += [key for key, raw in zip(keys, store.mget(keys) if keys else [], strict=True)
                         if raw is not None and landed(key, raw)]
            if left and not stream:
                results.unsubscribe(*left)  # type: ignore[no-untyped-call, unused-ignore]
    out.put(("tick", len(samples) % 50))
    out.put(("cpu", time.process_time() - cpu_at_start))
    out.put(("done", [(s.sent, s.done, s.ok, s.tokens, s.pieces) for s in samples]))


def _inferq_producer(settings: Settings, kind: Kind, count: int, window: int, new_tokens: NewTokens, offset: int,
                     start_at: float, out: Any) -> None:
    """Our Python producer: ``window`` threads each making blocking calls, merged by the client's coalescing."""
    import threading

    from producer.client import Client

    client = Client(settings)
    payload = payload_for(kind, new_tokens)
    samples: list[Sample] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def slot() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            sent = time.time()
            try:
                result = client.submit(kind, **payload(offset + index)).get(timeout=600)
                ok, tokens = True, int(result.get("completion_tokens", 0))
            except Exception:
                ok, tokens = False, 0
            with lock:
                samples.append(Sample(sent, time.time(), ok, tokens))
                if len(samples) % 50 == 0:
                    out.put(("tick", 50))

    while time.time() < start_at:
        time.sleep(0.001)
    cpu_at_start = time.process_time()
    threads = [threading.Thread(target=slot) for _ in range(window)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    out.put(("tick", len(samples) % 50))
    out.put(("cpu", time.process_time() - cpu_at_start))
    out.put(("done", [(s.sent, s.done, s.ok, s.tokens) for s in samples]))


@dataclass
class Load:
    samples: list[Sample]
    client_cpu_s: float  # CPU the producer processes spent while sending and reading (their share of the machine)


def run_load(settings: Settings, kind: Kind, count: int, concurrency: int, processes: int,
             new_tokens: NewTokens, progress: Callable[[int], None] | None = None, client: str = "plain",
             stream: bool = False) -> Load:
    """Send ``count`` requests with ``concurrency`` in flight over ``processes`` processes (generate requests
    streamed, with ``stream``: plain and raw clients only)."""
    processes = max(1, min(processes, concurrency))
    context = mp.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 2.0  # every process starts sending at once, after its imports
    shares = [count // processes + (1 if p < count % processes else 0) for p in range(processes)]
    windows = [concurrency // processes + (1 if p < concurrency % processes else 0) for p in range(processes)]
    target = _inferq_producer if client == "inferq" else _producer
    extra = () if client == "inferq" else (client == "raw", stream)
    workers = [context.Process(target=target, args=(settings, kind, share, window, new_tokens,
                                                       sum(shares[:p]), start_at, out, *extra))
               for p, (share, window) in enumerate(zip(shares, windows, strict=True))]
    for worker in workers:
        worker.start()
    samples: list[Sample] = []
    client_cpu = 0.0
    finished = 0
    while finished < len(workers):
        what, data = out.get()
        if what == "tick":
            if progress:
                progress(data)
        elif what == "cpu":
            client_cpu += data
        else:
            samples.extend(Sample(*row) for row in data)
            finished += 1
    for worker in workers:
        worker.join()
    return Load(samples, client_cpu)
