"""Kombu's Redis transport, taking waiting messages in bulk and hardened against entries that are not messages.

Kombu's worker side pays two Redis round trips per message: a BRPOP that returns one message, and a
pipeline that records it as unacknowledged. Between the two the message exists only in the worker's
memory, so a worker SIGKILLed there loses it for good. Here messages are taken by a Lua script that pops
up to the prefetch room off the queues and records each as unacknowledged in the same atomic step, and
while takes fill their room the channel takes again instead of waiting. Under load that is one
round trip per batch, and a kill at any moment leaves every message on its queue or recorded (where the
visibility timeout brings it back). On drained queues the channel waits with BRPOP on its lists' bells, which
hold tokens, never messages (waiting.py: one porter per queue rings them); on the lists themselves only where
no porter can run (RESP2, or client tracking refused), and the one message BRPOP then hands an idle worker
crosses the old window.

Anyone who can LPUSH to a queue can put anything there. Kombu decodes each popped entry as a JSON envelope
inside its event loop: an entry that is not JSON stops the worker ("Unrecoverable error"), and an envelope
without delivery info makes the consumer reconnect again and again. Here such an entry (envelopes.py says
which) is logged, counted and moved to the dead-letter list instead; the worker goes on. The worker's Celery
app uses this transport (``broker_transport``); producers keep Kombu's own.

It also survives losing Redis. When the connection drops, the consumer closes its channel; the channel then
puts its unacknowledged messages back on their queues, and task threads still acknowledge the messages they
finish through it. Kombu builds each new Redis connection pool from the transport's connection details, which
closing the channel removes: both raised AttributeError, an "Unrecoverable error" that ended the worker (seen
in our Redis-restart drill). The channel here keeps those details, so these calls reach Redis again, or fail
with a connection error that Kombu handles (a message not acknowledged then comes back after the visibility
timeout, finds its answer stored, and is not run again).

And it keeps the messages Redis hands out in the instant the connection drops. BRPOP takes a message off its
queue; only then does Kombu record it as unacknowledged (in Redis, where the visibility timeout brings it
back if the worker dies). A message popped just before Redis stopped cannot be recorded: Kombu raised and
forgot it, and a clean Redis restart lost it (1 of 397 in our drill). Here such a message is kept in the
worker's memory (stranded.py) and put back at the head of its queue by the first channel that reaches Redis
again; if the worker stops first, it is logged in full at CRITICAL so nothing is lost without a trace.

And it keeps room for interactive work. The bulk lane (messages of a priority above 0, in their queues' own
lists) may fill only ``BULK_LANE_SHARE`` of the prefetch limit: a worker whose window is full of bulk work
would take an interactive message only once a batch is acknowledged (and then behind the batch its device
started meanwhile: 361 ms at p50 against 12 ms unloaded, with 20,000 bulk messages queued). While the bulk
lane holds its share, takes skip the bulk lists and the channel waits on the interactive lists' bells alone
(or the lists, where no porter rings) for at most ``BULK_LANE_POLL_S``, so bulk work is taken again soon
after room frees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from queue import Empty
from typing import Any, cast

import orjson
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from producer.contract import message_priority
from producer.transport import FindsTheMaster
from workers.receiving import dead_letter
from workers.receiving.consumer import count_refused
from workers.receiving.envelopes import MAX_DEPTH, envelope_problem, nesting_problem
from workers.receiving.serialization import orjson_reads_exactly
from workers.receiving.stranded import stranded
from workers.receiving.waiting import RING_FUNCTION, Porter, bell, porter_lease

log = logging.getLogger(__name__)
# Messages taken in one step (the prefetch limit bounds it further).
BULK_MAX = 128
BULK_LANE_SHARE = 0.75  # of the prefetch limit, what messages of the bulk lane may hold
BULK_LANE_POLL_S = 0.05  # the wait for interactive messages while the bulk lane holds its share
# KEYS[1]: the index of delivery times, KEYS[2]: the envelopes (Kombu's unacknowledged records); then ARGV[5]
# lists, as many bells (one for each list, waiting.py), and the porter leases of their queues. Takes up to
# ARGV[1] entries off the lists (in that order) and, in the same atomic step, records each entry that is a
# message envelope as unacknowledged, exactly as Kombu's QoS.append records one; off the lists past the first
# ARGV[4] (the bulk lane's) at most ARGV[3] in all. Then rings the bell of each list it left entries on (its
# room ran out, or the bulk lane's share), so another waiting channel takes them. Returns {1 if every queue
# has a porter else 0, {list, entry, delivery tag or ""} per entry}.
TAKE_SCRIPT = RING_FUNCTION + """
local room = tonumber(ARGV[1])
local bulk_room = tonumber(ARGV[3])
local interactive = tonumber(ARGV[4])
local lists = tonumber(ARGV[5])
local taken = {}
local drained = {}  -- the lists an RPOP emptied (it returned fewer entries than it asked for)
for i = 3, 2 + lists do
  if room < 1 then break end
  local bulk = i - 3 >= interactive
  local limit = room
  if bulk then limit = math.min(room, bulk_room) end
  local entries = false
  if limit >= 1 then
    entries = redis.call('RPOP', KEYS[i], limit)
    drained[i] = not entries or #entries < limit
  end
  if entries then
    for _, raw in ipairs(entries) do
      local tag = ''
      local ok, envelope = pcall(cjson.decode, raw)
      if ok and type(envelope) == 'table' and type(envelope.body) == 'string' then
        local properties = envelope.properties
        if type(properties) == 'table' and type(properties.delivery_tag) == 'string'
            and type(properties.delivery_info) == 'table' then
          local info = properties.delivery_info
          if type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
            tag = properties.delivery_tag
            redis.call('ZADD', KEYS[1], ARGV[2], tag)
            local where = cjson.encode(info.exchange) .. ', ' .. cjson.encode(info.routing_key)
            redis.call('HSET', KEYS[2], tag, '[' .. raw .. ', ' .. where .. ']')
          end
        end
      end
      taken[#taken + 1] = KEYS[i]
      taken[#taken + 1] = raw
      taken[#taken + 1] = tag
    end
    room = room - #entries
    if bulk then bulk_room = bulk_room - #entries end
  end
end
for i = 3, 2 + lists do
  if not drained[i] then ring(KEYS[i], KEYS[i + lists]) end
end
local porters = 1
for i = 3 + 2 * lists, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then porters = 0 end
end
return {porters, taken}
"""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorded: set[str] = set()  # delivery tags record_all wrote to Redis ahead of their delivery
        self._bulk: set[str] = set()  # delivery tags of bulk-lane messages delivered here (some acknowledged since)
        self._running: set[str] = set()  # delivery tags the fast path runs, not answered yet (see restore_unacked)

    def hold(self, delivery_tag: str) -> None:
        """The fast path runs this message: should the channel close first, it is not put back (see below)."""
        self._running.add(delivery_tag)

    def restore_unacked(self, client: Any = None) -> Any:
        """At close (a lost connection: a socket timeout, a killed client, a Sentinel that names another
        master), what the channel holds goes back to its queue at once; but not what the fast path still runs:
        put back now, another receiver would run it beside this one, and of the two acknowledgements (the same
        delivery tag) the first would delete the other's record. Those keep their record, and are answered and
        acknowledged as they finish, or handed out again after the visibility timeout. At a warm shutdown the
        fast path has answered its messages first (``DrainFastPath``), and what it could not is put back."""
        if _KEEP_RUNNING_AT_CLOSE:
            for tag in self._running & self._delivered.keys():
                del self._delivered[tag]
        return super().restore_unacked(client)

    def bulk_room(self) -> int | None:
        """How many more bulk-lane messages this channel may take (None: no prefetch limit, no cap)."""
        if not self.prefetch_count:
            return None
        # the consumer's thread alone changes _bulk and _delivered; _dirty (acknowledged) is only tested
        self._bulk = {tag for tag in self._bulk if tag in self._delivered and tag not in self._dirty}
        # at least one: a prefetch of 1 (a worker of concurrency 1) would otherwise never take bulk work
        return max(0, max(1, int(self.prefetch_count * BULK_LANE_SHARE)) - len(self._bulk))

    def append(self, message: Any, delivery_tag: str) -> None:
        if message_priority((message.properties or {}).get("priority")) > 0:
            self._bulk.add(delivery_tag)
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)  # in memory only: Redis has it already
            return
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            info = message.delivery_info
            stranded.keep(delivery_tag, message._raw, info["exchange"], info["routing_key"])
            raise  # the consumer reconnects, as before; the message is not run from this delivery

    def ack_many(self, messages: list[Any]) -> None:
        """Acknowledges messages of this channel from any thread: one ZREM and one HDEL remove them all from
        Redis's unacknowledged set, then each is marked acknowledged in memory (a set insertion, which the
        consumer's own thread folds in before it next counts its prefetch room). Two commands a batch, not
        two a message: 2.5 us of redis-py a message against 14 in a pipeline of 128 (this CPU)."""
        tags = [message.delivery_tag for message in messages]
        with self.channel.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)
            pipe.execute()
        self._running.difference_update(tags)
        for message in messages:
            kombu_virtual.QoS.ack(self, message.delivery_tag)
            message._state = "ACK"


    def let_go(self, messages: list[Any]) -> None:
        """Frees the room of messages in this channel's prefetch window without acknowledging them: Redis keeps
        their unacknowledged record, so the visibility sweep hands them out again (their results could not be
        stored). Kept in the window, they filled it for good, and the channel stopped taking anything."""
        for message in messages:
            self._running.discard(message.delivery_tag)
            kombu_virtual.QoS.ack(self, message.delivery_tag)


def free_room(messages: list[Any]) -> None:
    """Messages of one channel whose results could not be stored: out of its prefetch window, unacknowledged
    (``QoS.let_go``). Kept in the window, they filled it for good."""
    let_go = getattr(messages[0].channel.qos, "let_go", None)  # our transport's QoS
    if let_go is not None:
        let_go(messages)


def put_back_running_at_close() -> None:
    """From now on (a warm shutdown, once the fast path drained), closing channels put back every message they
    hold, those the fast path could not finish too: the process is leaving."""
    global _KEEP_RUNNING_AT_CLOSE
    _KEEP_RUNNING_AT_CLOSE = False


_KEEP_RUNNING_AT_CLOSE = True


class Channel(kombu_redis.Channel):
    QoS = QoS
    _take_next = True  # whether the next read takes (the last take filled its room, a bell rang) or waits
    _in_flight = ""  # the read in flight: "take", "bell" (a wait on bells) or "" (Kombu's BRPOP of the queues)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._porters = False  # the last take found a porter holding each of its queues: bells get rung
        self.porter: Porter | None = None  # this channel's candidate porter (waiting.py), from its first take
        self._take_room = 0  # the prefetch room of the take in flight: one that fills it may leave more behind
        super().__init__(*args, **kwargs)  # connects, or raises a connection error
        if len(stranded):
            try:
                stranded.put_back(self)
            except self.connection_errors as exc:  # Redis went again: the next channel tries
                log.warning("could not put %d message(s) back yet: %s", len(stranded), exc)

    def _connparams(self, asynchronous: bool = False) -> Any:
        # Kombu reads the connection details from the transport whenever it makes a connection pool; once the
        # channel is closed they are gone. Remember them, so the restore on close and a late acknowledgement
        # reach Redis, or fail with a connection error Kombu handles, rather than an AttributeError.
        key = "_inferq_connparams_async" if asynchronous else "_inferq_connparams"
        if self.connection is not None and self.connection.client is not None:
            self.__dict__[key] = super()._connparams(asynchronous)
        return dict(self.__dict__[key])

    def _brpop_start(self, timeout: Any = None) -> None:
        # Kombu starts a read whenever none is in flight and the window has room. Here it is a take (atomic, it
        # does not block) while the last one filled its room or a bell rang; otherwise a wait: on the lists'
        # bells where porters ring them (waiting.py), with Kombu's BRPOP of the queues where none does.
        if self.global_keyprefix:  # the take's keys would need the prefix: Kombu's own path
            self._in_flight = ""
            super()._brpop_start(timeout)
            return
        lists = self._take_keys()
        if not lists:
            return
        if self._take_next:
            self._want_porter()
            self._send("take", "EVAL", *self._take_args(lists))
            return
        keys, wait = lists, float(timeout or self.brpop_timeout or 1)
        if self.qos.bulk_room() == 0:  # the bulk lane holds its share: news of the interactive lists alone
            keys, wait = [key for key in lists if self.sep not in key], BULK_LANE_POLL_S
        if self._porters:
            self._send("bell", "BRPOP", *map(bell, keys), wait)
        else:
            self._send("", "BRPOP", *keys, wait)

    def _send(self, in_flight: str, *command: Any) -> None:
        self._in_flight = in_flight
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # as Kombu does
        self.client.connection.send_command(*command)

    def _want_porter(self) -> None:
        """Starts this channel's porter, and tells it the queues it may claim."""
        if self.porter is None:
            self.porter = Porter(self._create_client())
        self.porter.want({queue: tuple(self._q_for_pri(queue, pri) for pri in self.priority_steps)
                          for queue in self.active_queues})

    def close(self) -> None:
        if self.porter is not None:
            self.porter.stop()  # its queues go to another receiver's porter
        super().close()

    def _brpop_read(self, **options: Any) -> bool:
        # Kombu's own _brpop_read, with the entry checked before it is delivered; or the replies of a take sent
        # in BRPOP's place; or a bell's token, after which the channel takes.
        connection = self.client.connection
        in_flight, self._in_flight = self._in_flight, ""
        try:
            try:
                reply = self.client.parse_response(connection, "EVAL" if in_flight == "take" else "BRPOP", **options)
            except self.connection_errors:
                connection.disconnect()
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as Kombu does
            self._flush_reauth()
        if in_flight == "take":
            porters, entries = reply
            self._porters = bool(int(porters))
            taken = self._deliver_taken(entries)
            self._take_next = taken >= self._take_room  # more may wait: take again as soon as the window has room
            if not taken:
                raise Empty()
            return True
        self._take_next = True  # a bell rang, a message came by BRPOP, or the wait timed out: take next
        if in_flight == "bell" or not reply:
            raise Empty()
        key, item = reply
        dest = _text(key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        self._deliver_entry(dest, item)
        return True

    def _flush_reauth(self) -> None:
        flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # Kombu >= 5.7
        if flush_reauth is not None:
            flush_reauth()

    def _deliver_entry(self, queue: str, item: bytes) -> None:
        payload = self._envelope(queue, item)
        if payload is not None:
            self.connection._deliver(payload, queue)

    def _envelope(self, queue: str, item: bytes) -> dict[str, Any] | None:
        """The entry's decoded message envelope; None (and the entry dead-lettered) when it is not one."""
        try:
            payload = None
            if orjson_reads_exactly(item):
                with contextlib.suppress(orjson.JSONDecodeError):  # 3 us for an envelope, against 12 us
                    payload = orjson.loads(item)
            if payload is None:  # the standard library accepts a little more (NaN) and names what is wrong
                payload = json.loads(_text(item))
            problem = envelope_problem(payload)
            if problem is None and item.count(b"[") + item.count(b"{") > MAX_DEPTH:  # only then can it be
                problem = nesting_problem(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            problem = f"the entry is not JSON ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is not None:
            self._dead_letter(queue, item, problem)
            return None
        return cast(dict[str, Any], payload)

    def _take_keys(self) -> list[str]:
        # the interactive lists (step 0, named like their queues) first, then each bulk step's
        queues = self._queue_cycle.consume(len(self.active_queues))
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _take_args(self, lists: list[str]) -> list[Any]:
        """The take's EVAL arguments: up to the prefetch room, the messages waiting now, taken off their lists
        and recorded as unacknowledged in one atomic step, then delivered. A worker killed at any moment
        leaves each message either on its list or recorded, where the visibility timeout brings it back;
        with Kombu's RPOP followed by a separate record, a SIGKILL between the two lost what was popped (up to
        128 messages: 3 kills in 8 lost 1 or 128 in our reproduction). Under load that is one round trip per
        batch."""
        room = self.qos.can_consume_max_estimate()
        room = BULK_MAX if room is None else max(1, min(room, BULK_MAX))
        bulk_room = self.qos.bulk_room()
        interactive = sum(1 for key in lists if self.sep not in key)
        self._take_room = room
        leases = [porter_lease(queue) for queue in dict.fromkeys(key.split(self.sep)[0] for key in lists)]
        return [TAKE_SCRIPT, 2 + 2 * len(lists) + len(leases), self.unacked_index_key, self.unacked_key, *lists,
                *map(bell, lists), *leases, room, time.time(), room if bulk_room is None else bulk_room,
                interactive, len(lists)]

    def _deliver_taken(self, reply: list[bytes]) -> int:
        """Delivers what a take returned (list, entry, tag triples); how many entries it took."""
        entries = [(reply[at], reply[at + 1], reply[at + 2]) for at in range(0, len(reply or []), 3)]
        delivered: list[tuple[dict[str, Any], str]] = []
        for key, item, tag in entries:
            queue = _text(key).rsplit(self.sep, 1)[0]
            payload = self._envelope(queue, item)
            if payload is None:
                if tag:  # the script recorded what this side refuses (invalid UTF-8, say): forget the record
                    with self.client.pipeline(transaction=True) as pipe:
                        pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag).execute()
                continue
            if tag:
                self.qos._recorded.add(_text(tag))
            delivered.append((payload, queue))
        if delivered:
            self._queue_cycle.rotate(delivered[-1][1])
        for index, (payload, queue) in enumerate(delivered):
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._give_back([payload for payload, _ in delivered[index + 1:]])
                raise
        return len(entries)

    def _give_back(self, payloads: list[dict[str, Any]]) -> None:
        """Recorded but not delivered (a delivery before them raised): back on the queue now, not after the
        visibility timeout."""
        for payload in payloads:
            tag = payload["properties"]["delivery_tag"]
            self.qos._recorded.discard(tag)
            try:
                self.qos.restore_by_tag(tag)
            except Exception:  # the visibility timeout brings it back
                log.warning("message %s goes back to its queue after the visibility timeout", tag, exc_info=True)

    def _dead_letter(self, queue: str, item: bytes, problem: str) -> None:
        count_refused("not_an_envelope")
        log.error("dropped an entry of queue %r that is not a message: %s; kept in %s", queue, problem,
                  dead_letter.DEAD_LETTER_KEY)
        try:
            with self.conn_or_acquire() as client:
                dead_letter.record(client, f"not a message: {problem}", queue, item)
        except Exception:  # the worker goes on; the log line above stands
            log.exception("could not keep the dropped entry in %s", dead_letter.DEAD_LETTER_KEY)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(FindsTheMaster, Channel, kombu_redis.SentinelChannel):
    """The same channel on the master of a Sentinel group (``producer.transport.FindsTheMaster``)."""

    def _brpop_start(self, timeout: Any = None) -> None:
        # A master replaced while it lived keeps this connection, and hands out what producers still push to
        # it, until Sentinel demotes it seconds later: leave it as soon as the sentinels name another.
        if self._master_watch.moved(self.client.connection_pool, self.client.connection):
            raise redis.ConnectionError("the sentinels name another master now")
        super()._brpop_start(timeout)


class SentinelTransport(Transport):
    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]
