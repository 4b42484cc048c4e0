"""How an idle worker channel waits for messages without taking one: a bell per queue list, rung by a porter.

Kombu waits on empty queues with BRPOP, which takes the next message off its queue and writes it to the
worker's socket; nothing records it in Redis until the worker has read it and written the record, a round
trip later. A worker SIGKILLed in between loses it, and a host whose network link is cut while it waits
loses it for good: Redis still counts a silent peer's BRPOP as waiting and hands it the next message, which
is then in no queue and no record (tests/test_multi_host_drill.py).

Here a channel with nothing to take waits with BRPOP on its lists' *bells* (``inferq:bell:<list>``), which
hold tokens, never messages; once one comes (or the wait times out) it takes with the atomic script
(transport.TAKE_SCRIPT), so at every moment each message is on its queue, recorded as unacknowledged, or
answered. A token lost with a cut link loses nothing: the message is still on its queue.

Who rings: for each queue, one porter in the whole deployment (a lease, ``inferq:porter:<queue>``, held by
whichever receiver claimed it first and renewed every half second) is told of every write to the queue's
lists by Redis client tracking (``CLIENT TRACKING ON BCAST PREFIX <queue> NOLOOP`` on a RESP3 connection:
Redis 6 or later, or Valkey, no server configuration) and rings the bell of each list that then holds
entries. BRPOP hands each token to one waiting channel, the one that has waited longest, as it handed out
messages. A take that leaves entries behind (its prefetch room ran out) rings their bells itself, in the
same atomic step, so a burst spreads over the waiting channels without the porter.

Why not every waiting channel tracking its queues (this project's first version): Redis pushes every write
to every tracking connection, so every idle receiver woke and sent a take for each message. With 8 receivers
on one queue that cost 64-66 Redis commands and 7.9-11.0 ms of worker CPU a message against 19.2 and 4.2-5.8
with BRPOP (``python -m benchmarks.herd``, RESULTS). With a porter, a message wakes the porter and one channel.

What it costs and where it falls back:
- One hop more than BRPOP: Redis pushes to the porter, the porter rings, Redis hands the token to a channel.
- Where no porter holds a queue's lease (none could turn tracking on: RESP2, a refusing ACL; or a porter
  lost its connection and none has claimed the queue since), the take says so and the channel waits on
  BRPOP of its queues, as Kombu does, and the window above is open again for that wait.
- A porter that dies without handing its queues on (a SIGKILL, a cut link) rings nothing until its lease
  runs out (``LEASE_MS``): meanwhile a message waits for the end of a channel's bell wait (1 s) at most.
- Tracking ignores databases: a write to a list named like a queue in another database of the same server
  wakes the porter, whose ring finds the list empty in its own database and rings nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

log = logging.getLogger(__name__)
BELL_PREFIX = "inferq:bell:"
PORTER_PREFIX = "inferq:porter:"
LEASE_MS = 2000  # how long a porter's claim on a queue outlives its last renewal
RENEW_S = 0.5  # how often a porter renews its claims, and tries to claim the queues no porter holds
RETRY_S = 0.5  # the pause after a lost connection
SOCKET_TIMEOUT_S = LEASE_MS / 1000
FIRST_CLAIM_WAIT_S = 1.0  # how long a channel's first take waits for its porter's first claim
INVALIDATE = (b"invalidate", "invalidate")
_warned = False  # the fallback to BRPOP is logged once per process, not once per porter

# KEYS: porter leases; ARGV[1]: this porter's id, ARGV[2]: the lease in ms. Renews the leases this porter
# holds and claims the free ones; returns the (1-based) indexes of the keys it holds now.
_CLAIM_SCRIPT = """
local held = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[#held + 1] = i
  elseif not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[#held + 1] = i
  end
end
return held
"""
# KEYS: leases; ARGV[1]: this porter's id. Gives up the leases it holds.
_RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""
# Rings a list's bell when the list holds entries: one token at most waits on a bell (a channel that wakes takes
# everything there is, up to its room, and rings again if it leaves some), and a bell already holding one is
# not written again. The porter's ring and the take (transport.TAKE_SCRIPT) both use it.
RING_FUNCTION = """
local function ring(list, bell)
  if redis.call('LLEN', list) > 0 and redis.call('LLEN', bell) == 0 then
    redis.call('LPUSH', bell, 1)
  end
end
"""
# KEYS[i]: a list, KEYS[n + i]: its bell (n = #KEYS / 2).
RING_SCRIPT = RING_FUNCTION + """
local n = #KEYS / 2
for i = 1, n do ring(KEYS[i], KEYS[n + i]) end
return 1
"""

_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_CLAIM_SCRIPT, _RELEASE_SCRIPT, RING_SCRIPT)}


def bell(list_key: str) -> str:
    return BELL_PREFIX + list_key


def porter_lease(queue: str) -> str:
    return PORTER_PREFIX + queue


def tracking_prefixes(queues: Iterable[str]) -> tuple[str, ...]:
    """Prefixes covering every list of these queues (a queue's name, which its priority lists extend), none
    the prefix of another: Redis refuses overlapping prefixes on one connection."""
    kept: list[str] = []
    for name in sorted(set(queues)):  # sorted, a prefix comes before every name it covers
        if not any(name.startswith(prefix) for prefix in kept):
            kept.append(name)
    return tuple(kept)


def tracking_on(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    # NOLOOP: the porter's own writes (its bells) do not wake it
    return ("CLIENT", "TRACKING", "ON", "BCAST", *[arg for prefix in prefixes for arg in ("PREFIX", prefix)],
            "NOLOOP")


def speaks_resp3(connection: Any) -> bool:
    get_protocol = getattr(connection, "get_protocol", None)
    protocol = get_protocol() if get_protocol is not None else getattr(connection, "protocol", 2)
    return str(protocol) == "3"


class CannotTrack(Exception):
    """This server or connection cannot push news of writes: no porter can run here."""


class Porter:
    """A thread that claims the queues no porter holds, and rings the bells of the lists Redis says changed.
    One per consuming channel; ``want`` tells it the channel's queues and their lists."""

    def __init__(self, client: redis.Redis) -> None:
        self.id = uuid.uuid4().hex
        self.usable = True  # until the server shows it cannot push (RESP2, tracking refused)
        self._client = client  # for its connection pool
        self._lists: dict[str, tuple[str, ...]] = {}  # queue -> its lists, as the channel takes them
        self._held: tuple[str, ...] = ()  # the queues whose lease this porter holds, and tracks
        self._heard: set[bytes] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._claimed = threading.Event()  # set after the first claim (or the first failure)
        self._failing = False  # since a lost connection, until a claim succeeds: it is logged once
        self._thread: threading.Thread | None = None

    def want(self, lists: dict[str, tuple[str, ...]]) -> None:
        """The queues to port, each with its lists. The first call starts the thread and waits (a moment) for
        its first claim, so that the channel's first take already finds a porter, and waits on bells."""
        with self._lock:
            if lists == self._lists:
                return
            self._lists = dict(lists)
        if self._thread is None and self.usable:
            self._thread = threading.Thread(target=self._run, name="inferq-porter", daemon=True)
            self._thread.start()
            self._claimed.wait(FIRST_CLAIM_WAIT_S)

    def stop(self) -> None:
        """The thread hands its queues on (releases its leases) and ends at its next turn, within RENEW_S; a
        channel's close does not wait for it."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            connection: Any = None
            try:
                connection = self._connect()
                self._serve(connection)
            except CannotTrack as exc:
                self._give_up(str(exc))
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # its leases run out meanwhile: the takes then say no porter holds the queue (BRPOP on it)
                (log.debug if self._failing else log.warning)(
                    "porter %s lost its connection (it tries again every %.1f s): %s", self.id, RETRY_S, exc)
                self._failing = True
                self._stop.wait(RETRY_S)
            except Exception:  # the porter must not die of a surprise: channels then wait on BRPOP
                log.exception("porter %s failed; it starts again", self.id)
                self._stop.wait(RETRY_S)
            finally:
                self._claimed.set()  # a first claim that failed: the channel need not wait for it any longer
                if connection is not None:
                    self._close(connection)  # and this porter holds nothing from now

    def _connect(self) -> Any:
        pool = self._client.connection_pool
        # a connection of the pool's kind (a Sentinel pool's finds the master) that the pool does not count: the
        # pool's own would be one fewer for the channel after each reconnect, made with make_connection
        kwargs = {**pool.connection_kwargs, "socket_timeout": SOCKET_TIMEOUT_S}  # a silent link ends a read
        connection: Any = pool.connection_class(**kwargs)
        connection.connect()
        if not speaks_resp3(connection):
            connection.disconnect()
            raise CannotTrack("the connection speaks RESP2, so Redis cannot push to it")
        if not hasattr(getattr(connection, "_parser", None), "set_invalidation_push_handler"):
            connection.disconnect()
            raise CannotTrack("this redis-py parser does not hand over Redis's pushes")
        connection._parser.set_invalidation_push_handler(self._hear)
        self._command(connection, "CLIENT", "SETNAME", "inferq-porter")  # CLIENT LIST shows who it is
        return connection

    def _serve(self, connection: Any) -> None:
        due = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= due:
                self._claim(connection)
                self._claimed.set()
                self._failing = False
                due = now + RENEW_S
            if connection.can_read(timeout=max(0.0, due - time.monotonic())):
                # the pushes waiting now (within a turn: the renewal must not wait behind a stream of them),
                # then one ring for them all
                while time.monotonic() < due and connection.can_read(timeout=0):
                    read = connection.read_response(push_request=True)
                    # a push comes back as _hear returned it, or None (one redis-py handles itself)
                    if read is not None and not (isinstance(read, list) and read and read[0] in INVALIDATE):
                        raise redis.ConnectionError(f"a reply to no command: {str(read)[:100]}")
            heard, self._heard = self._heard, set()
            if heard:
                self._ring(connection, [key for key in self._held_lists() if key.encode() in heard])

    def _claim(self, connection: Any) -> None:
        with self._lock:
            queues = tuple(sorted(self._lists))
        held: tuple[str, ...] = ()
        if queues:
            indexes = self._script(connection, _CLAIM_SCRIPT, [*map(porter_lease, queues)], self.id, LEASE_MS)
            held = tuple(queues[int(index) - 1] for index in indexes)
        if held != self._held:
            if self._held:
                self._command(connection, "CLIENT", "TRACKING", "OFF")
            if held:
                try:
                    self._command(connection, *tracking_on(tracking_prefixes(held)))
                except redis.ResponseError as exc:
                    self._release(connection, held)
                    raise CannotTrack(f"Redis refused CLIENT TRACKING: {exc}") from exc
            self._release(connection, [queue for queue in self._held if queue not in held])
            self._held = held
            # writes between the claim and tracking's start were pushed to nobody: ring what they left
            self._ring(connection, self._held_lists())

    def _release(self, connection: Any, queues: Iterable[str]) -> None:
        leases = [porter_lease(queue) for queue in queues]
        if leases:
            self._script(connection, _RELEASE_SCRIPT, leases, self.id)

    def _held_lists(self) -> list[str]:
        with self._lock:
            return [key for queue in self._held for key in self._lists.get(queue, ())]

    def _ring(self, connection: Any, lists: list[str]) -> None:
        if lists:
            self._script(connection, RING_SCRIPT, [*lists, *map(bell, lists)])

    @staticmethod
    def _command(connection: Any, *args: Any) -> Any:
        connection.send_command(*args)
        return connection.read_response()  # pushes read meanwhile go to _hear

    def _script(self, connection: Any, script: str, keys: list[str], *args: Any) -> Any:
        """EVALSHA, loading the script where Redis does not have it (a restart flushed it)."""
        try:
            return self._command(connection, "EVALSHA", _SHA[script], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self._command(connection, "SCRIPT", "LOAD", script)
            return self._command(connection, "EVALSHA", _SHA[script], len(keys), *keys, *args)

    def _hear(self, push: list[Any]) -> list[Any]:
        keys = push[1] if len(push) > 1 else None  # None: the server was flushed, nothing to ring
        self._heard.update(key.encode() if isinstance(key, str) else key for key in keys or ())
        return push

    def _close(self, connection: Any) -> None:
        held, self._held = self._held, ()
        try:
            if self._stop.is_set():  # a porter stopping hands its queues on at once
                self._release(connection, held)
        except (redis.RedisError, OSError):
            pass  # the leases run out by themselves
        connection.disconnect()

    def _give_up(self, why: str) -> None:
        global _warned
        self.usable = False
        if not _warned:
            _warned = True
            log.warning("no porter can run at %s: %s. Idle receivers wait with BRPOP, and a message BRPOP hands a "
                        "worker whose link is cut is then lost (README, Trade-offs)",
                        self._client.connection_pool.connection_kwargs.get("host", "Redis"), why)
