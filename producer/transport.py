"""The producers' Redis transport for a Sentinel group, and for task messages that must reach replicas.

On a sentinel:// URL the master is found as ``redis_clients.Sentinel`` finds it (at once after a failover),
and publishing asks the sentinels at most twice a second whether its connections still reach it
(``redis_clients.MasterWatch``).

With ``INFERQ_BROKER_WAIT_REPLICAS=N``, each task message is pushed and followed, on the same connection, by
Redis's ``WAIT N timeout``: the call returns only once N replicas hold the message. Replication is otherwise
asynchronous, and a Sentinel failover can drop what the old master took last; and a master that Sentinel
replaced while it was alive (a manual failover, a partition) accepts writes until its clients notice, which it
drops when it becomes a replica. A replaced master's replicas follow the new one, so its WAIT gets no
acknowledgement and the send goes again; only a send at the very moment of the promotion can be acknowledged
by a replica that is not the one promoted (tests/test_sentinel_drill.py: 0, 0 and 2 lost in three runs; N =
every replica closes that, refusing sends until the old master has rejoined).

When fewer replicas answer in time, the connections are dropped (the next one asks the sentinels for the
master again) and Kombu's publish retry sends the message again; after the retries the caller gets
InferqConnectionError. A message whose first push did reach a real master may so be sent twice: it runs
twice, and its result is stored once (a stored SUCCESS is never overwritten).

On a plain Redis without the setting, producers use Kombu's own transport unchanged.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from producer.redis_clients import SENTINEL_PORT, MasterWatch, Sentinel, SentinelGroup

WAIT_OPTIONS = ("wait_replicas", "wait_timeout_ms")  # transport options, set by producer.app from the settings


class _WaitForReplicas:
    wait_replicas = 0
    wait_timeout_ms = 1000

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        channel: Any = self
        if not self.wait_replicas or kwargs.get("_publish_batch") is not None or queue in channel._expires:
            super()._put(queue, message, **kwargs)  # type: ignore[misc]
            return
        key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
        with channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:  # one connection: WAIT counts this push
                pipe.lpush(key, dumps(message))  # type: ignore[no-untyped-call]
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                _, acknowledged = pipe.execute()
            if acknowledged < self.wait_replicas:
                client.connection_pool.disconnect()  # perhaps a master since replaced: find the master again
                raise redis.ConnectionError(
                    f"the task message reached {acknowledged} of the {self.wait_replicas} replica(s) "
                    f"INFERQ_BROKER_WAIT_REPLICAS asks for within {self.wait_timeout_ms} ms")


class FindsTheMaster:
    """For a Kombu SentinelChannel: the master found as ``redis_clients.Sentinel`` finds it (as the sentinels name
    it to clients, at once after a failover), and the pool's connections checked now and then
    (``redis_clients.MasterWatch``).

    Kombu's own reads the sentinels' addresses from the live connection each time it makes a pool, which a
    closed channel no longer has: a worker's late acknowledgement of a message taken before the broker was
    lost comes through such a channel (tests/test_sentinel_drill.py: AttributeError on ``alt``). The
    addresses are remembered here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        client = (args[0] if args else kwargs["connection"]).client
        # Kombu lists the entries of a URL with several; one sentinel alone is the connection's own address
        self._inferq_group = (SentinelGroup.from_url(";".join(client.alt)) if client.alt else
                              SentinelGroup([(client.hostname, client.port or SENTINEL_PORT)], 0, None, None))
        self._master_watch = MasterWatch()  # for the connection that reads (BRPOP), where a subclass asks
        self._pool_watch = MasterWatch()  # for the pool that publishes, binds and routes: a turn of its own
        super().__init__(*args, **kwargs)

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        channel: Any = self
        params = channel._connparams(asynchronous)
        for key in ("host", "port"):
            params.pop(key, None)
        # The master's credentials from the whole URL: when Kombu moves on to the next sentinel it reads them from
        # that entry alone, which may not repeat them
        group = self._inferq_group
        if group.password is not None:
            params.update(username=group.username, password=group.password)
        sentinel = Sentinel(group.sentinels, min_other_sentinels=getattr(self, "min_other_sentinels", 0) or 0,
                            sentinel_kwargs=getattr(self, "sentinel_kwargs", None), **params)
        if asynchronous:  # so that closing the channel closes the sentinels' connections too, as Kombu does
            channel._async_sentinel_manager = sentinel
        else:
            channel._sentinel_manager = sentinel
        master_name = getattr(self, "master_name", None)
        if master_name is None:
            raise ValueError("the 'master_name' transport option must be set for a sentinel:// broker")
        credentials = {key: params[key] for key in ("username", "password") if key in params}
        return sentinel.master_for(master_name, redis.Redis, **credentials).connection_pool

    # Every write and lookup the channel makes outside its BRPOP connection goes through its pool, which
    # redis-py points at the master only when it makes a connection: each first leaves an old master.
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        self._follow_master()
        super()._put(queue, message, **kwargs)  # type: ignore[misc]

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        self._follow_master()  # a remote-control broadcast: the workers listen on the master
        super()._put_fanout(exchange, message, routing_key, **kwargs)  # type: ignore[misc]

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._follow_master()  # a broadcast's reply queue, bound just before it goes out
        super()._queue_bind(exchange, routing_key, pattern, queue)  # type: ignore[misc]

    def get_table(self, exchange: str) -> Any:
        self._follow_master()  # where a worker's reply is routed: the bindings on the master
        return super().get_table(exchange)  # type: ignore[misc]

    def _follow_master(self) -> None:
        """Leaves an old master, at most every half second (MasterWatch): the pool that publishes, binds and
        routes closes its idle connections to it. Without this, after a live master's replacement, a client's
        remote-control broadcast and the binding of its reply queue went to the old master, and a worker
        routed its reply by the old master's bindings: `inferq check` went unanswered until the old master
        was demoted (tests/test_sentinel_drill.py)."""
        channel: Any = self
        self._pool_watch.moved(channel.pool)


_PLAIN, _SENTINEL = kombu_redis.Channel.from_transport_options, kombu_redis.SentinelChannel.from_transport_options


class Channel(_WaitForReplicas, kombu_redis.Channel):
    from_transport_options = _PLAIN + WAIT_OPTIONS  # type: ignore[assignment]  # (a longer tuple, that is all)


class SentinelChannel(FindsTheMaster, _WaitForReplicas, kombu_redis.SentinelChannel):
    from_transport_options = _SENTINEL + WAIT_OPTIONS  # type: ignore[assignment]

    def _follow_master(self) -> None:
        """And a producer's reply-reading connection (BRPOP, between broadcasts) leaves it too, even with the
        read of a broadcast that timed out still pending: a producer's channel serves one thread at a time, and
        Kombu's poller connects a dropped connection again (to the master) before its next read."""
        super()._follow_master()
        channel: Any = self
        master = channel.pool.master_address
        client = channel.__dict__.get("client")  # where Kombu made it already
        connection = getattr(client, "connection", None)
        if master is not None and connection is not None and connection._sock is not None \
                and (connection.host, connection.port) != master \
                and not channel.connection.cycle._in_protected_read:
            connection.disconnect()  # Kombu's hook forgets the read in flight where the poller registered it
            if channel._in_poll is connection:
                channel._in_poll = None


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
