"""How an idle worker channel waits for messages without taking one: Redis client tracking.

Kombu waits on empty queues with BRPOP, which takes the next message off its queue and writes it to the
worker's socket; nothing records it in Redis until the worker has read it and written the record, a round
trip later. A worker SIGKILLed in between loses it, and a host whose network link is cut while it waits
loses it for good: Redis still counts a silent peer's BRPOP as waiting and hands it the next message, which
is then in no queue and no record (tests/test_multi_host_drill.py).

Here a channel with nothing to take turns on client tracking in broadcast mode for its queues' names
(``CLIENT TRACKING ON BCAST PREFIX <queue> ... NOLOOP``: Redis 6 or later, or Valkey, no server
configuration) and parks: it sends nothing, and Redis pushes an invalidation on the same RESP3 connection
when any other client writes a matching key (a producer's LPUSH, a restore of unacknowledged messages). The
push takes nothing. The channel then takes with the atomic script (transport.TAKE_SCRIPT), so at every
moment each message is on its queue, recorded as unacknowledged, or answered, whatever happens to the
worker or its link.

What it costs:
- Every parked channel of a queue wakes on a push, where BRPOP woke one: one takes the message and the
  others find nothing and park again (an empty take each). Other workers' takes change the lists too, and
  wake them as well. Redis sends one push per event-loop turn and prefix, however many keys changed in it,
  and a push names the keys: news of lists the channel cannot take from now (the bulk lists, while the bulk
  lane holds its share of the prefetch window) does not end its park.
- A take that comes back full (a backlog, where nothing waits) turns tracking off at once (no push must
  pile up in Redis while the prefetch window is full); one that does not turns it on again, in the next
  take's round trip.
- A park ends without a push after ``brpop_timeout`` (1 s; 50 ms while the bulk lane holds its share) with
  a take: like BRPOP's timeout, that finds a connection that died silently (Kombu's BRPOP health check then
  sees a take go unanswered).
- A connection that speaks RESP2 (a proxy, an old server) or a server that refuses CLIENT TRACKING cannot
  be told: the channel falls back to BRPOP, with a warning (once per process), and the window above is
  back.
- Tracking ignores databases: a write to a key named like a queue in another database of the same server
  wakes the channel for an empty take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)
TRACKING_OFF = ("CLIENT", "TRACKING", "OFF")
INVALIDATE = (b"invalidate", "invalidate")
_warned = False  # the fallback to BRPOP is logged once per process, not once per channel


def tracking_prefixes(queues: Iterable[str]) -> tuple[str, ...]:
    """Prefixes covering every list of these queues (a queue's name, which its priority lists extend), none
    the prefix of another: Redis refuses overlapping prefixes on one connection."""
    kept: list[str] = []
    for name in sorted(set(queues)):  # sorted, a prefix comes before every name it covers
        if not any(name.startswith(prefix) for prefix in kept):
            kept.append(name)
    return tuple(kept)


def tracking_on(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    # NOLOOP: this connection's own takes do not wake it
    return ("CLIENT", "TRACKING", "ON", "BCAST", *[arg for prefix in prefixes for arg in ("PREFIX", prefix)],
            "NOLOOP")


def speaks_resp3(connection: Any) -> bool:
    get_protocol = getattr(connection, "get_protocol", None)
    protocol = get_protocol() if get_protocol is not None else getattr(connection, "protocol", 2)
    return str(protocol) == "3"


class IdleWait:
    """One channel's side of it: whether tracking is on for its connection, and whether it is parked. While
    tracking is on, the channel is parked or has a take in flight: a push reaching a connection with nothing
    in flight and no park would be read as the reply to a command never sent (Kombu drops the connection, or
    blocks reading it)."""

    def __init__(self) -> None:
        self.usable = True  # until a connection shows it cannot be told (RESP2, tracking refused)
        self._on: Any = None  # the socket whose connection has tracking on, for self._prefixes
        self._prefixes: tuple[str, ...] = ()
        self._asked: tuple[str, ...] = ()  # the prefixes of the ON command in flight
        self.sent: list[tuple[str, ...]] = []  # tracking commands in flight ahead of a take
        self.parked_on: Any = None  # the socket of the connection parked on, None when not parked
        self.deadline = 0.0
        self._timer: Any = None
        self._watched: frozenset[bytes] = frozenset()  # the lists whose change ends the park
        self._heard: set[bytes] = set()  # the keys Redis said changed, since last cleared

    def commands(self, connection: Any, queues: Iterable[str], backlog: bool) -> list[tuple[str, ...]]:
        """The tracking commands to send ahead of the next take: off under a backlog, on for these queues
        otherwise. Remembered in ``sent`` until ``confirm`` reads their replies."""
        self.sent = []
        on = self._on is not None and self._on is connection._sock
        commands: list[tuple[str, ...]] = []
        if backlog:
            if on:
                commands.append(TRACKING_OFF)
        else:
            prefixes = tracking_prefixes(queues)
            if not (on and self._prefixes == prefixes):
                if not speaks_resp3(connection):
                    self.give_up(connection, "the connection speaks RESP2, so Redis cannot push to it")
                    return []
                if not hasattr(getattr(connection, "_parser", None), "set_invalidation_push_handler"):
                    self.give_up(connection, "this redis-py parser does not hand over Redis's pushes")
                    return []
                if on:
                    commands.append(TRACKING_OFF)  # new queues: Redis refuses a prefix it already has
                commands.append(tracking_on(prefixes))
                self._asked = prefixes
        self.sent = commands
        return commands

    def confirm(self, connection: Any, read: Callable[[], Any], errors: type[Exception]) -> None:
        """Reads the replies of the tracking commands sent; one refused gives tracking up for this channel."""
        sent, self.sent = self.sent, []
        for command in sent:
            try:
                read()
            except errors as exc:
                self._on = None
                self.give_up(connection, f"Redis refused {' '.join(command[:3])}: {exc}")
                continue
            if command == TRACKING_OFF:
                self._on = None
            else:
                self._on, self._prefixes = connection._sock, self._asked
                # redis-py hands each invalidation push to this, wherever it reads one on this connection
                connection._parser.set_invalidation_push_handler(self._hear)

    def tracking(self, connection: Any) -> bool:
        return self.usable and self._on is not None and self._on is connection._sock

    def give_up(self, connection: Any, why: str) -> None:
        global _warned
        self.usable = False
        self.sent = []
        if not _warned:
            _warned = True
            log.warning("idle receivers wait with BRPOP at %s: %s. A message BRPOP hands a worker whose link is "
                        "cut is then lost (README, Trade-offs)", getattr(connection, "host", "Redis"), why)

    def _hear(self, push: list[Any]) -> list[Any]:
        keys = push[1] if len(push) > 1 else None  # None: the server was flushed, nothing to take
        self._heard.update(key.encode() if isinstance(key, str) else key for key in keys or ())
        return push

    def forget_heard(self) -> None:
        """Pushes read so far tell of writes the take just read already saw."""
        self._heard.clear()

    def news(self, connection: Any) -> bool:
        """Reads every push waiting on the connection (in redis-py's buffer or the socket): whether one told
        of a watched list."""
        try:
            while connection.can_read(timeout=0):
                read = connection.read_response(push_request=True)
                # a push comes back as our handler returned it (or None, for one redis-py handles itself)
                if read is not None and not (isinstance(read, list) and read and read[0] in INVALIDATE):
                    raise redis.ConnectionError(f"a reply to no command: {str(read)[:100]}")
        except Exception as exc:  # closed, or a reply to nothing: out of step, start again
            connection.disconnect()
            raise redis.ConnectionError(f"reading Redis's pushes: {exc}") from exc
        news = not self._watched.isdisjoint(self._heard)
        self._heard.clear()
        return news

    def watch(self, keys: Iterable[str]) -> None:
        """The lists whose news ends a park from now on."""
        self._watched = frozenset(key.encode() for key in keys)

    def park(self, connection: Any, delay: float, hub: Any) -> None:
        """Parks until a push tells of a watched list, or ``delay`` passes (0: at the next turn of the event
        loop where the channel may take)."""
        self.parked_on = connection._sock
        self.deadline = time.monotonic() + delay
        if hub is not None and delay > 0:  # the hub's turn after the deadline ends the park (Poller)
            self._timer = hub.call_later(delay, _nothing)

    def unpark(self) -> Any:
        """Ends the park; the socket it was on (None when it was not parked)."""
        parked_on, self.parked_on = self.parked_on, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return parked_on


def _nothing() -> None:
    """A hub timer's callback: the timer is there to end the hub's poll, after which its tick runs."""


class Poller(kombu_redis.MultiChannelPoller):
    """Kombu's poller, ending the parks whose deadline has passed before each turn (the channel's next
    read is then a take), and polling no longer than until the next deadline."""

    hub: Any = None  # the worker's event loop, when it runs one (Transport.register_with_event_loop)

    def _parked(self) -> list[Any]:
        """The parked channels that may take once their park ends: a park stays while a channel has no
        queues, or no room in its prefetch window (Kombu then stops polling it until room frees)."""
        return [channel for channel in self._channels
                if getattr(channel, "idle_wait", None) is not None and channel.idle_wait.parked_on is not None
                and channel.active_queues and channel.qos.can_consume()]

    def on_poll_start(self) -> None:
        now = time.monotonic()
        for channel in self._parked():
            if channel.idle_wait.deadline <= now:
                channel.end_park()
        super().on_poll_start()  # type: ignore[no-untyped-call]

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        parked = self._parked()
        if parked:
            until = max(0.0, min(channel.idle_wait.deadline for channel in parked) - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        return super().get(callback, timeout)  # type: ignore[no-untyped-call]
