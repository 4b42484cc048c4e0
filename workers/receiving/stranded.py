"""Messages popped off their queue that Redis went away before recording as unacknowledged.

They live only in this worker's memory: the first channel that reaches Redis again puts them back at the head
of their queues; a worker that stops first logs each in full at CRITICAL, so none is lost without a trace.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING, Any

from kombu.utils.json import dumps

from workers.exits import before_hard_exit

if TYPE_CHECKING:
    from workers.receiving.transport import Channel

log = logging.getLogger(__name__)


class Stranded:
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
                    # without bindings (a Redis that restarted empty, before the queues are declared again) the
                    # routing key names the queue: inferq routes every message to the queue of its name
                    for queue in channel._lookup(exchange, routing_key) or [routing_key]:
                        priority = channel._get_message_priority(raw, reverse=False)
                        pipe.rpush(channel._q_for_pri(queue, priority), dumps(raw))  # BRPOP's next
                    pipe.execute()
                del self._messages[tag]
                log.warning("message %s put back on its queue", tag)

    def report_lost(self) -> None:
        locked = self._lock.acquire(timeout=1.0)  # a put_back stuck on Redis must not hold up a failing exit
        try:
            for tag, (raw, _, routing_key) in list(self._messages.items()):
                log.critical("the worker stops with message %s of queue %r that Redis never took back; its "
                             "envelope, to LPUSH by hand: %s", tag, routing_key, dumps(raw))
        finally:
            if locked:
                self._lock.release()


stranded = Stranded()
atexit.register(stranded.report_lost)
before_hard_exit(stranded.report_lost)  # a receiver whose device process died, or whose device stalled
