"""The worker's broker transport takes the messages waiting behind a BRPOP in bulk, within the prefetch limit,
and records every one of them as unacknowledged before it is delivered (Kombu's own path, not a mock)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer
from kombu import Queue as KombuQueue

from producer.contract import queue_keys
from tests.conftest import REDIS_HOST, REDIS_PORT, flushed_db, free_port, start_redis_server, stop
from workers.receiving.dead_letter import DEAD_LETTER_KEY
from workers.receiving.transport import Transport
from workers.receiving.waiting import porter_lease, tracking_prefixes

pytestmark = pytest.mark.integration
DB = 7
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"


class LongWaits(Transport):
    """Bell waits of 5 s (1 s by default): a wake-up well under that was the bell's, on a machine however busy.
    (Kombu's polling_interval would set it too, but also sleep that long after every empty poll.)"""

    brpop_timeout = 5


class TwoSecondWaits(Transport):
    brpop_timeout = 2


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    with flushed_db(DB) as client:
        yield client


@contextmanager
def own_redis(workdir: Path, *args: str) -> Iterator[redis.Redis]:
    """A redis-server of the test's own (``args``: more of its options), and a client of it."""
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port)
    server = start_redis_server(workdir, ["--port", str(port), *args], client)
    try:
        yield client
    finally:
        stop(server, 10)
        client.close()


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[redis.Redis]:
    """For tests that count Redis's commands or read porter leases: on the shared server other tests' workers
    take too, and client tracking tells porters of every database of a write to a queue's list."""
    with own_redis(tmp_path) as client:
        yield client


def url_of(store: redis.Redis) -> str:
    kwargs = store.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


@contextmanager
def received(prefetch: int | None, published: list[str], entries: tuple[bytes, ...] = (),
             url: str = URL) -> Iterator[list[Any]]:
    """Publishes, pushes raw `entries` behind them, then runs one drain_events: the messages it delivered,
    while the channel is open (closing it puts the unacknowledged ones back)."""
    delivered: list[Any] = []
    with Connection(url, transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        for body in published:
            Producer(channel).publish(body, routing_key="embed", declare=[queue])
        raw = redis.Redis.from_url(url)
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


def commands_run(store: redis.Redis, command: str) -> int:
    return int(store.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def drain(connection: Connection, seconds: float) -> None:
    with contextlib.suppress(socket.timeout, TimeoutError):
        connection.drain_events(timeout=seconds)


def test_an_idle_channel_waits_instead_of_taking_again_and_again(own_store: redis.Redis) -> None:
    """After a take that found messages the next read is a take; once one finds the queues drained, the
    channel must wait (a version that kept taking sent 13,000 empty takes in 40 s and starved the model of
    CPU): on its lists' bells, its porter holding the queue."""
    store = own_store
    with received(None, [f"message {i}" for i in range(5)], url=url_of(store)) as delivered:
        assert len(delivered) == 5
        channel = delivered[0].channel
        evals = commands_run(store, "eval")  # the channel's takes (its porter runs its scripts by EVALSHA)
        started = time.monotonic()
        # on a busy machine its porter's first claim can come after the first wait began (on the lists then)
        assert_waits_on_bells_again(channel, store)
        for _ in range(3):  # 1.5 s more with an empty queue
            drain(channel.connection.client, 0.5)
        # a take after each wait that ran out (one a second), never one after another
        assert commands_run(store, "eval") - evals <= 3 + int(time.monotonic() - started)
        # its waits still go to the bells ("bell" while one is in flight; "" for the instant between two)
        assert channel._porters and channel._in_flight in ("bell", "")
        assert store.get(porter_lease("embed")) == channel.porter.id.encode()


def test_a_message_pushed_while_a_channel_waits_stays_on_its_queue_until_a_take_records_it(
        store: redis.Redis) -> None:
    """An idle channel waits with nothing in flight that could take a message: one pushed meanwhile stays on
    its queue while the worker does not read (a host whose link is cut, a process stopped), where any other
    worker can take it; once the worker reads again, the bell its porter rang wakes it and it takes the
    message with its record. BRPOP would have popped it into the socket at once, recorded nowhere."""
    delivered: list[Any] = []
    with Connection(URL, transport=LongWaits) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            deadline = time.monotonic() + 10  # nothing to take: the channel waits on the bells (its porter's
            while channel._in_flight != "bell" and time.monotonic() < deadline:  # first claim may come late)
                drain(connection, 0.3)
            assert channel._in_flight == "bell"
            Producer(connection.channel()).publish("while waiting", routing_key="embed", declare=[queue])
            time.sleep(0.3)  # the worker reads nothing meanwhile
            assert store.llen("embed") == 1 and store.hlen("unacked") == 0
            started = time.monotonic()
            connection.drain_events(timeout=5)
            assert [message.payload for message in delivered] == ["while waiting"]
            assert time.monotonic() - started < 2.5  # woken by the bell, not by the end of its wait
            assert store.llen("embed") == 0 and store.hkeys("unacked") == [delivered[0].delivery_tag.encode()]


def test_a_message_wakes_one_waiting_channel_not_all_of_them(own_store: redis.Redis) -> None:
    """Five channels wait on one queue. Each message wakes one of them (the porter rings its list's bell
    once, and BRPOP hands the token to one waiter): every waiting channel woken for every message sent 5
    takes a message, 4 of them empty, and cost 8 receivers about twice the CPU of BRPOP (RESULTS)."""
    store, queue = own_store, KombuQueue("embed", routing_key="embed")
    delivered: list[Any] = []
    with contextlib.ExitStack() as stack:
        connections = [stack.enter_context(Connection(url_of(store), transport=Transport)) for _ in range(5)]
        channels = [connection.channel() for connection in connections]
        for connection, channel in zip(connections, channels, strict=True):
            stack.enter_context(Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]))
            drain(connection, 0.05)
        for connection in connections:
            drain(connection, 0.05)  # each waits on the bells now
        holder = store.get(porter_lease("embed"))
        # one porter for the queue, of the five
        assert [channel.porter.id.encode() == holder for channel in channels].count(True) == 1
        producer = Producer(connections[0].channel())
        evals, started = commands_run(store, "eval"), time.monotonic()
        for i in range(10):
            producer.publish(f"message {i}", routing_key="embed", declare=[queue])
            for connection in connections:
                drain(connection, 0.01)
        deadline = time.monotonic() + 10  # on a busy machine a take can come after the loop above
        while len(delivered) < 10 and time.monotonic() < deadline:
            for connection in connections:
                drain(connection, 0.05)
        assert sorted(message.payload for message in delivered) == sorted(f"message {i}" for i in range(10))
        # a take for each message, and at most one a second for each channel whose wait ran out meanwhile
        assert commands_run(store, "eval") - evals <= 10 + 5 * (int(time.monotonic() - started) + 1)


def test_when_the_porter_goes_another_takes_its_queue_over(own_store: redis.Redis) -> None:
    """The channel whose porter holds the queue closes: its porter hands the queue on, another channel's porter
    claims it, and a message pushed then still wakes a waiting channel at once."""
    store, queue = own_store, KombuQueue("embed", routing_key="embed")
    delivered: list[Any] = []
    with Connection(url_of(store), transport=LongWaits) as first, \
            Connection(url_of(store), transport=LongWaits) as second:
        channels = [first.channel(), second.channel()]
        consumers = [Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)])
                     for channel in channels]
        for consumer in consumers:
            consumer.consume()
        drain(first, 0.1)
        drain(second, 0.1)
        holder = store.get(porter_lease("embed"))
        leaving = next(index for index, channel in enumerate(channels) if channel.porter.id.encode() == holder)
        staying = channels[1 - leaving]
        consumers[leaving].cancel()
        channels[leaving].close()
        assert_waits_on_bells_again(staying, store)
        Producer(staying.connection.client.channel()).publish("after", routing_key="embed", declare=[queue])
        time.sleep(0.3)  # the worker reads nothing meanwhile: the message stays on its list
        assert store.llen("embed") == 1
        started = time.monotonic()
        staying.connection.client.drain_events(timeout=5)
        assert [message.payload for message in delivered] == ["after"]
        assert time.monotonic() - started < 2.5  # woken by the bell, not by the end of its wait
        consumers[1 - leaving].cancel()


def assert_waits_on_bells_again(channel: Any, store: redis.Redis) -> None:
    """Until the channel's porter holds the queue and the channel waits on the bells (its next take sees
    the porter), or fails after a few seconds."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            store.get(porter_lease("embed")) == channel.porter.id.encode() and channel._in_flight == "bell"):
        drain(channel.connection.client, 0.2)
    assert store.get(porter_lease("embed")) == channel.porter.id.encode()
    assert channel._in_flight == "bell"


def test_a_lease_left_by_a_dead_porter_delays_a_message_by_one_wait_at_most(own_store: redis.Redis) -> None:
    """A porter that died without handing its queue on (a SIGKILL, a cut link) leaves its lease behind: the
    channel waits on a bell nobody rings, so a message pushed meanwhile is taken when the channel's wait ends
    (here 2 s), not later, and never lost. Once the lease runs out, this channel's porter claims the queue and
    the next message wakes the channel at once."""
    store, queue = own_store, KombuQueue("embed", routing_key="embed")
    store.set(porter_lease("embed"), "a porter that died", px=5000)
    delivered: list[Any] = []
    with Connection(url_of(store), transport=TwoSecondWaits) as connection:
        channel = connection.channel()
        producer = Producer(connection.channel())
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            drain(connection, 0.3)
            assert channel._in_flight == "bell" and store.get(porter_lease("embed")) == b"a porter that died"
            lease_left = store.pttl(porter_lease("embed")) / 1000
            assert lease_left > 3, f"the set-up took too long: the dead porter's lease has {lease_left} s left"
            producer.publish("while nobody rings", routing_key="embed", declare=[queue])
            started = time.monotonic()
            connection.drain_events(timeout=5)
            assert [message.payload for message in delivered] == ["while nobody rings"]
            # the end of one bell wait (2 s) and a take, before the lease ran out and a porter could ring
            assert time.monotonic() - started < lease_left - 0.5
            assert_waits_on_bells_again(channel, store)  # the lease ran out; this channel's porter holds it
            producer.publish("rung", routing_key="embed", declare=[queue])
            started = time.monotonic()
            connection.drain_events(timeout=5)
            assert delivered[-1].payload == "rung" and time.monotonic() - started < 1.5  # the bell, not the wait


def test_a_porter_whose_connection_is_killed_connects_again_and_rings(own_store: redis.Redis) -> None:
    """Redis drops the porter's connection (CLIENT KILL, here more times than the channel's pool holds
    connections): each time it connects again, claims the queue again, and the channel it serves is woken
    by its bell, with no connection of the channel's pool used up."""
    store, queue = own_store, KombuQueue("embed", routing_key="embed")
    delivered: list[Any] = []
    with Connection(url_of(store), transport=Transport) as connection:
        channel = connection.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            drain(connection, 0.3)
            pool = channel.porter._client.connection_pool
            created = pool._created_connections
            for _ in range(pool.max_connections + 2):
                ids = [client["id"] for client in store.client_list() if client["name"] == "inferq-porter"]
                assert len(ids) == 1
                store.execute_command("CLIENT", "KILL", "ID", ids[0])
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and [client["id"] for client in store.client_list()
                                                       if client["name"] == "inferq-porter"] in ([], ids):
                    drain(connection, 0.1)
                assert_waits_on_bells_again(channel, store)
            assert pool._created_connections == created
            Producer(connection.channel()).publish("rung", routing_key="embed", declare=[queue])
            connection.drain_events(timeout=5)
            assert [message.payload for message in delivered] == ["rung"]


def test_news_while_the_prefetch_window_is_full_waits_for_room_on_the_same_connection(store: redis.Redis) -> None:
    """A take fills the window (prefetch 1); a second message comes and its bell is rung while the channel
    cannot take. Once the first is acknowledged the second is taken, on the same connection."""
    delivered: list[Any] = []
    with Connection(URL, transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        producer = Producer(connection.channel())
        channel.basic_qos(0, 1, False)
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            drain(connection, 0.3)
            producer.publish("first", routing_key="embed", declare=[queue])
            drain(connection, 0.5)
            assert [message.payload for message in delivered] == ["first"]
            sock = channel.client.connection._sock
            producer.publish("second", routing_key="embed", declare=[queue])
            drain(connection, 0.5)
            assert len(delivered) == 1 and store.llen("embed") == 1  # no room: it waits on its queue
            delivered[0].ack()
            drain(connection, 0.5)
            assert [message.payload for message in delivered] == ["first", "second"]
            assert channel.client.connection._sock is sock


def test_where_redis_refuses_client_tracking_the_channel_waits_with_brpop(tmp_path: Path) -> None:
    """A server (or an ACL) that refuses CLIENT TRACKING: no porter can hold the queue, the porter says so
    once, and the channel waits on BRPOP of the queue, as Kombu does, and still delivers."""
    with own_redis(tmp_path, "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-client|tracking") as probe:
        delivered: list[Any] = []
        with Connection(url_of(probe), transport=Transport) as connection:
            channel = connection.channel()
            queue = KombuQueue("embed", routing_key="embed")
            with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
                drain(connection, 0.3)
                assert channel.porter._claimed.wait(5)  # it tried, and gave up
                assert not channel.porter.usable and probe.get(porter_lease("embed")) is None
                assert channel._in_flight == ""  # Kombu's BRPOP
                Producer(connection.channel()).publish("by BRPOP", routing_key="embed", declare=[queue])
                connection.drain_events(timeout=5)
                assert [message.payload for message in delivered] == ["by BRPOP"]
                assert probe.hlen("unacked") == 1


def test_tracking_prefixes_cover_every_queue_list_without_overlapping() -> None:
    assert tracking_prefixes(["embed", "classify", "embed"]) == ("classify", "embed")
    # "embed-large" starts with "embed": Redis refuses overlapping prefixes, and "embed" covers both
    assert tracking_prefixes(["embed-large", "embed", "generate"]) == ("embed", "generate")
    assert tracking_prefixes([]) == ()


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


def test_a_closing_channel_puts_back_what_it_holds_but_not_what_the_fast_path_still_runs(store: redis.Redis) -> None:
    """A lost connection closes the consumer's channel, which puts its messages back at once: one the fast path
    still runs would run again beside it, on another receiver, and the first acknowledgement would delete the
    second delivery's record. It keeps its record instead, until it is answered (or the visibility timeout)."""
    delivered: list[Any] = []
    connection = Connection(URL, transport=Transport)
    try:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        for body in ("running", "waiting"):
            Producer(channel).publish(body, routing_key="embed", declare=[queue])
        consumer = Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)])
        consumer.consume()
        connection.drain_events(timeout=5)
        running, waiting = sorted(delivered, key=lambda message: message.payload != "running")
        assert (running.payload, waiting.payload) == ("running", "waiting")
        channel.qos.hold(running.delivery_tag)  # as the fast path does as it takes a message
        channel.close()
        back = [json.loads(entry)["properties"]["delivery_tag"] for entry in store.lrange("embed", 0, -1)]
        assert back == [waiting.delivery_tag]  # only the other one is back on the queue
        assert store.hkeys("unacked") == [running.delivery_tag.encode()]
        channel.qos.ack_many([running])  # answered after the close: its own record goes
        assert store.hlen("unacked") == 0
    finally:
        connection.release()


def test_a_stranded_message_goes_back_to_its_queue_even_before_the_queues_are_declared_again(
        store: redis.Redis) -> None:
    """A Redis that restarted empty (no persistence) has no queue bindings until the consumer declares them:
    the first channel used to drop the stranded message there (and log that it was put back)."""
    from workers.receiving.stranded import stranded

    raw = {"body": "W1tdLHt9LHt9XQ==", "content-encoding": "utf-8", "content-type": "application/json",
           "headers": {"task": "inferq.embed", "id": "stranded-1"},
           "properties": {"delivery_tag": "stranded-tag", "body_encoding": "base64", "priority": 0,
                          "delivery_info": {"exchange": "embed", "routing_key": "embed"}}}
    assert not store.keys("_kombu.binding.*")
    stranded.keep("stranded-tag", raw, "embed", "embed")
    with Connection(URL, transport=Transport) as connection:
        connection.channel()  # the first channel to reach Redis puts it back
        assert len(stranded) == 0
        assert [json.loads(entry)["headers"]["id"] for entry in store.lrange("embed", 0, -1)] == ["stranded-1"]


def test_a_prefetch_of_one_still_takes_bulk_work(store: redis.Redis) -> None:
    """A worker of concurrency 1: three quarters of one message is none, and bulk work waited for ever."""
    delivered: list[Any] = []
    with Connection(URL, transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        Producer(channel).publish("bulk", routing_key="embed", declare=[queue], priority=9)
        channel.basic_qos(0, 1, False)
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            deadline = time.monotonic() + 5
            while not delivered and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout, TimeoutError):
                    connection.drain_events(timeout=0.3)
            assert [m.payload for m in delivered] == ["bulk"]
            delivered[0].ack()


def test_while_the_bulk_lane_holds_its_share_bulk_pushes_do_not_wake_the_channel(own_store: redis.Redis) -> None:
    """With the bulk lane's share full, only interactive messages can be taken before room frees: the bulk
    lists' bells must not send a take each (the channel waits on the interactive ones, 50 ms at a time)."""
    delivered: list[Any] = []
    bulk_list, store = queue_keys("embed")[-1], own_store
    with Connection(url_of(store), transport=Transport) as connection:
        channel = connection.channel()
        queue = KombuQueue("embed", routing_key="embed")
        producer = Producer(connection.channel())
        for i in range(8):
            producer.publish(f"bulk {i}", routing_key="embed", declare=[queue], priority=9)
        channel.basic_qos(0, 8, False)
        with Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]):
            drain(connection, 0.3)
            assert len(delivered) == 6  # the bulk lane's share of 8
            evals = commands_run(store, "eval")
            started = time.monotonic()
            for i in range(100):  # 100 bulk pushes over about a second
                store.lpush(bulk_list, f"not read {i}")
                drain(connection, 0.01)
            elapsed = time.monotonic() - started
            # a take per 50 ms at most (and a few more for the hub's turns), not one per push
            assert commands_run(store, "eval") - evals <= elapsed / 0.05 + 5
            producer.publish("interactive", routing_key="embed", declare=[queue])
            drain(connection, 0.3)
            assert delivered[-1].payload == "interactive"



def test_a_receiver_that_exits_at_once_still_logs_the_messages_only_it_held() -> None:
    """A receiver whose device process died (or whose device stalled) leaves with os._exit, which skips
    atexit: the CRITICAL line with each stranded message's envelope, its only trace, was never written."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = """
import logging
logging.basicConfig(level="INFO")
from workers.receiving.stranded import stranded
from workers.exits import hard_exit
stranded.keep("kept-tag", {"body": "e30=", "headers": {"id": "only-here"}}, "embed", "embed")
hard_exit(70)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 70, done.stderr
    assert "CRITICAL" in done.stderr and "kept-tag" in done.stderr and "only-here" in done.stderr, done.stderr
