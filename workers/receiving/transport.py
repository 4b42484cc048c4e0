"""Kombu's Redis transport, taking waiting messages in bulk and hardened against entries that are not messages.

Kombu's worker side pays two Redis round trips per message: a BRPOP that returns one message, and a
pipeline that records it as unacknowledged. Here, once a BRPOP returns, the messages waiting behind it in
the same queue are taken with one RPOP (as many as the prefetch limit leaves room for) and all recorded in
one pipeline before any is delivered; each is then delivered and acknowledged as before. Under load that is
two round trips per batch of messages (worker CPU for 4,000 single-text requests: 59-62 s against 67-71 s).

Anyone who can LPUSH to a queue can put anything there. Kombu decodes each popped entry as a JSON envelope
inside its event loop: an entry that is not JSON stops the worker ("Unrecoverable error"), and an envelope
without delivery info makes the consumer reconnect again and again. Here such an entry is logged, counted
and moved to the dead-letter list instead; the worker goes on. The worker's Celery app uses this transport
(``broker_transport``); producers keep Kombu's own.

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
worker's memory and put back at the head of its queue by the first channel that reaches Redis again; if the
worker stops first, it is logged in full at CRITICAL so nothing is lost without a trace.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from queue import Empty
from typing import Any, cast

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.json import dumps

from workers.receiving import dead_letter
from workers.receiving.consumer import count_refused

log = logging.getLogger(__name__)
# Messages taken in one RPOP behind a BRPOP (the prefetch limit bounds it further).
BULK_MAX = 128


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def envelope_problem(payload: Any) -> str | None:
    """Why a decoded list entry cannot be delivered as a message; None when it can."""
    if not isinstance(payload, dict):
        return f"the entry is JSON {type(payload).__name__}, not a message envelope object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no 'properties' object"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not isinstance(info.get("exchange"), str) \
            or not isinstance(info.get("routing_key"), str):
        return "the envelope's properties.delivery_info lacks 'exchange' or 'routing_key'"
    if "delivery_tag" not in properties:
        return "the envelope's properties lack a 'delivery_tag'"
    if not isinstance(payload.get("body"), str):
        return "the envelope has no string 'body'"
    return None


class _Stranded:
    """Messages popped off their queue that could not be recorded as unacknowledged: they live only here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, tuple[dict[str, Any], str, str]] = {}  # delivery tag -> (raw, exchange, key)

    def keep(self, tag: str, raw: dict[str, Any], exchange: str, routing_key: str) -> None:
        with self._lock:
            self._messages[tag] = (raw, exchange, routing_key)
        log.warning("Redis went away as message %s was delivered; it is kept here and put back on its queue "
                    "once Redis answers", tag)

    def __len__(self) -> int:
        return len(self._messages)

    def put_back(self, channel: Channel) -> None:
        """Back at the head of their queues; those Redis does not take stay here for the next channel."""
        with self._lock:
            for tag, (raw, exchange, routing_key) in list(self._messages.items()):
                with channel.client.pipeline(transaction=True) as pipe:
                    # Had the record reached Redis after all, the visibility timeout must not bring it back too.
                    pipe.zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag)
                    for queue in channel._lookup(exchange, routing_key):
                        priority = channel._get_message_priority(raw, reverse=False)
                        pipe.rpush(channel._q_for_pri(queue, priority), dumps(raw))  # BRPOP's next
                    pipe.execute()
                del self._messages[tag]
                log.warning("message %s put back on its queue", tag)

    def report_lost(self) -> None:
        with self._lock:
            for tag, (raw, _, routing_key) in self._messages.items():
                log.critical("the worker stops with message %s of queue %r that Redis never took back; its "
                             "envelope, to LPUSH by hand: %s", tag, routing_key, dumps(raw))


_stranded = _Stranded()
atexit.register(_stranded.report_lost)


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorded: set[str] = set()  # delivery tags record_all wrote to Redis ahead of their delivery

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)  # in memory only: Redis has it already
            return
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            info = message.delivery_info
            _stranded.keep(delivery_tag, message._raw, info["exchange"], info["routing_key"])
            raise  # the consumer reconnects, as before; the message is not run from this delivery

    def ack_many(self, messages: list[Any]) -> None:
        """Acknowledges messages of this channel from any thread: one pipeline removes them all from Redis's
        unacknowledged set, then each is marked acknowledged in memory (a set insertion, which the consumer's
        own thread folds in before it next counts its prefetch room)."""
        with self.channel.client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.zrem(self.unacked_index_key, message.delivery_tag).hdel(self.unacked_key, message.delivery_tag)
            pipe.execute()
        for message in messages:
            kombu_virtual.QoS.ack(self, message.delivery_tag)
            message._state = "ACK"

    def record_all(self, payloads: list[dict[str, Any]]) -> None:
        """What append writes to Redis, for many messages in one round trip (they are delivered next)."""
        now = time.time()
        try:
            with self.channel.client.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    properties = payload["properties"]
                    info = properties["delivery_info"]
                    tag = properties["delivery_tag"]
                    pipe.zadd(self.unacked_index_key, {tag: now})
                    pipe.hset(self.unacked_key, tag, dumps([payload, info["exchange"], info["routing_key"]]))
                pipe.execute()
        except self.channel.connection_errors:
            for payload in payloads:
                info = payload["properties"]["delivery_info"]
                _stranded.keep(payload["properties"]["delivery_tag"], payload, info["exchange"], info["routing_key"])
            raise
        self._recorded.update(payload["properties"]["delivery_tag"] for payload in payloads)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects, or raises a connection error
        if len(_stranded):
            try:
                _stranded.put_back(self)
            except self.connection_errors as exc:  # Redis went again: the next channel tries
                log.warning("could not put %d message(s) back yet: %s", len(_stranded), exc)

    def _connparams(self, asynchronous: bool = False) -> Any:
        # Kombu reads the connection details from the transport whenever it makes a connection pool; once the
        # channel is closed they are gone. Remember them, so the restore on close and a late acknowledgement
        # reach Redis, or fail with a connection error Kombu handles, rather than an AttributeError.
        key = "_inferq_connparams_async" if asynchronous else "_inferq_connparams"
        if self.connection is not None and self.connection.client is not None:
            self.__dict__[key] = super()._connparams(asynchronous)
        return dict(self.__dict__[key])

    def _brpop_read(self, **options: Any) -> bool:
        # Kombu's own _brpop_read, with the entry checked before it is delivered, and then whatever else waits
        # in the same queue taken in bulk, as far as the prefetch limit allows.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            key, item = dest__item
            dest = _text(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_entry(dest, item)
            self._take_more(_text(key), dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as Kombu does

    def _deliver_entry(self, queue: str, item: bytes) -> None:
        payload = self._envelope(queue, item)
        if payload is not None:
            self.connection._deliver(payload, queue)

    def _envelope(self, queue: str, item: bytes) -> dict[str, Any] | None:
        """The entry's decoded message envelope; None (and the entry dead-lettered) when it is not one."""
        try:
            payload = json.loads(_text(item))
            problem = envelope_problem(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"the entry is not JSON ({type(exc).__name__}: {exc})"
        if problem is not None:
            self._dead_letter(queue, item, problem)
            return None
        return cast(dict[str, Any], payload)

    def _take_more(self, key: str, queue: str) -> None:
        """Up to the prefetch room, the messages waiting behind the one BRPOP gave: one RPOP for all of them,
        and one pipeline recording them all as unacknowledged, instead of a BRPOP and a record per message.
        A worker under load pays those two round trips per batch rather than per message."""
        room = self.qos.can_consume_max_estimate()
        room = BULK_MAX if room is None else min(room, BULK_MAX)
        if room < 1 or self.global_keyprefix or not self.qos.can_consume():
            return
        envelopes = (self._envelope(queue, item) for item in self.client.rpop(key, room) or [])
        payloads = [payload for payload in envelopes if payload is not None]
        if payloads:
            self.qos.record_all(payloads)
        for index, payload in enumerate(payloads):
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._give_back(payloads[index + 1:])
                raise

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
