"""Kombu's Redis transport, hardened against list entries that are not message envelopes.

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
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from workers import dead_letter
from workers.consumer import count_refused

log = logging.getLogger(__name__)


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


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        # Kombu reads the connection details from the transport whenever it makes a connection pool; once the
        # channel is closed they are gone. Remember them, so the restore on close and a late acknowledgement
        # reach Redis, or fail with a connection error Kombu handles, rather than an AttributeError.
        key = "_inferq_connparams_async" if asynchronous else "_inferq_connparams"
        if self.connection is not None and self.connection.client is not None:
            self.__dict__[key] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        return dict(self.__dict__[key])

    def _brpop_read(self, **options: Any) -> bool:
        # Kombu's own _brpop_read, with the entry checked before it is delivered.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = _text(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = json.loads(_text(item))
                problem = envelope_problem(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                problem = f"the entry is not JSON ({type(exc).__name__}: {exc})"
            if problem is not None:
                self._dead_letter(dest, item, problem)
                return True
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as Kombu does

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
