"""The worker's broker transport takes the messages waiting behind a BRPOP in bulk, within the prefetch limit,
and records every one of them as unacknowledged before it is delivered (Kombu's own path, not a mock)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer
from kombu import Queue as KombuQueue

from producer.contract import queue_keys
from tests.conftest import REDIS_HOST, REDIS_PORT, flushed_db
from workers.receiving.dead_letter import DEAD_LETTER_KEY
from workers.receiving.transport import Transport

pytestmark = pytest.mark.integration
DB = 7
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    with flushed_db(DB) as client:
        yield client


@contextmanager
def received(prefetch: int | None, published: list[str], entries: tuple[bytes, ...] = ()) -> Iterator[list[Any]]:
    """Publishes, pushes raw `entries` behind them, then runs one drain_events: the messages it delivered,
    while the channel is open (closing it puts the unacknowledged ones back)."""
    delivered: list[Any] = []
    with Connection(URL, transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        for body in published:
            Producer(channel).publish(body, routing_key="embed", declare=[queue])
        raw = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
        for entry in entries:
            raw.lpush("embed", entry)
        raw.close()
        if prefetch is not None:
            channel.basic_qos(0, prefetch, False)
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            connection.drain_events(timeout=5)
            yield delivered


def test_one_read_delivers_every_waiting_message_in_order_each_recorded_as_unacknowledged(
        store: redis.Redis) -> None:
    sent = [f"message {i}" for i in range(20)]
    with received(None, sent) as delivered:
        assert [message.payload for message in delivered] == sent
        assert store.llen("embed") == 0
        tags = [message.delivery_tag for message in delivered]
        recorded = store.hgetall("unacked")
        assert sorted(recorded) == sorted(tag.encode() for tag in tags)
        assert store.zcard("unacked_index") == 20
        # each record is what the visibility timeout would put back: the whole envelope, exchange, routing key
        envelope, _, routing_key = json.loads(recorded[tags[3].encode()])
        assert routing_key == "embed" and envelope["properties"]["delivery_tag"] == tags[3]
        delivered[0].ack()
        assert store.hlen("unacked") == 19
    assert store.llen("embed") == 19  # closing the channel put back what was not acknowledged


def test_the_prefetch_limit_bounds_what_is_taken(store: redis.Redis) -> None:
    with received(3, [f"message {i}" for i in range(10)]) as delivered:
        assert [message.payload for message in delivered] == ["message 0", "message 1", "message 2"]
        assert store.llen("embed") == 7 and store.hlen("unacked") == 3


def test_an_entry_that_is_not_a_message_among_the_bulk_goes_to_the_dead_letter_list(store: redis.Redis) -> None:
    with received(None, ["first", "second"], (b"not json at all",)) as delivered:
        assert [message.payload for message in delivered] == ["first", "second"]
        dead = store.lrange(DEAD_LETTER_KEY, 0, -1)
        assert len(dead) == 1 and b"not json at all" in dead[0]
        assert store.hlen("unacked") == 2


def test_an_entry_the_take_recorded_but_the_worker_refuses_leaves_no_record_behind(store: redis.Redis) -> None:
    """The take's Lua script records any entry shaped like an envelope; the worker then refuses one that is
    not valid UTF-8. Its record must go, or the visibility timeout would bring it back again and again."""
    bad = (b'{"body": "\xff\xfe", "properties": {"delivery_tag": "not-utf8", "delivery_info": '
           b'{"exchange": "", "routing_key": "embed"}}}')
    with received(None, ["first"], (bad,)) as delivered:
        assert [message.payload for message in delivered] == ["first"]
        assert store.llen(DEAD_LETTER_KEY) == 1
        assert store.hkeys("unacked") == [delivered[0].delivery_tag.encode()]
        assert store.zcard("unacked_index") == 1


def test_an_idle_channel_blocks_on_brpop_instead_of_taking_again_and_again(store: redis.Redis) -> None:
    """After a take that found messages the next read is a take; once one finds nothing, the channel must go
    back to blocking on BRPOP (a version that kept taking sent 13,000 empty takes in 40 s and starved the
    model of CPU)."""
    def evals() -> int:
        return int(store.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))

    with received(None, [f"message {i}" for i in range(5)]) as delivered:
        assert len(delivered) == 5
        channel = delivered[0].channel
        before = evals()
        for _ in range(3):  # 1.5 s with an empty queue
            with contextlib.suppress(socket.timeout, TimeoutError):
                channel.connection.client.drain_events(timeout=0.5)
        assert evals() - before <= 3


def test_the_bulk_lane_fills_only_its_share_of_the_prefetch_window(store: redis.Redis) -> None:
    """Prefetch 8: bulk messages (priority 9) fill 6 of it, so the 2 left take interactive messages at once,
    while bulk work still waits; an acknowledgement makes room for bulk work again."""
    delivered: list[Any] = []
    bulk_list = queue_keys("embed")[-1]
    with Connection(URL, transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        for i in range(20):
            Producer(channel).publish(f"bulk {i}", routing_key="embed", declare=[queue], priority=9)
        assert store.llen(bulk_list) == 20
        channel.basic_qos(0, 8, False)

        def drain() -> None:
            for _ in range(3):
                with contextlib.suppress(socket.timeout, TimeoutError):
                    connection.drain_events(timeout=0.3)

        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            drain()
            assert [m.payload for m in delivered] == [f"bulk {i}" for i in range(6)]
            assert store.llen(bulk_list) == 14
            for i in range(2):
                Producer(channel).publish(f"interactive {i}", routing_key="embed", declare=[queue])
            drain()
            assert [m.payload for m in delivered[6:]] == ["interactive 0", "interactive 1"]
            assert store.llen(bulk_list) == 14 and store.hlen("unacked") == 8
            for message in delivered[:3]:
                message.ack()
            drain()
            assert [m.payload for m in delivered[8:]] == ["bulk 6", "bulk 7", "bulk 8"]
            assert store.llen(bulk_list) == 11
