"""Finding a Sentinel group's master, and producers that wait for replicas (the drill with real sentinels and
a failover is tests/test_sentinel_drill.py)."""

from __future__ import annotations

import pytest

from producer.client import Client
from producer.errors import InferqConnectionError
from producer.redis_clients import _named_master
from producer.settings import Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, flushed_db

OLD = {"ip": "10.0.0.1", "port": 6379}


def test_the_master_is_the_address_the_sentinels_name_to_clients() -> None:
    # during a failover SENTINEL MASTER still describes the old master; GET-MASTER-ADDR-BY-NAME names the
    # promoted replica, which is the master clients must write to, whatever the old one's state
    assert _named_master(OLD, [b"10.0.0.2", b"6380"], healthy=False) == ("10.0.0.2", 6380)
    assert _named_master(OLD, [b"10.0.0.2", b"6380"], healthy=True) == ("10.0.0.2", 6380)
    # no failover: the master it describes, only while it is up
    assert _named_master(OLD, [b"10.0.0.1", b"6379"], healthy=True) == ("10.0.0.1", 6379)
    assert _named_master(OLD, [b"10.0.0.1", b"6379"], healthy=False) is None
    assert _named_master(OLD, None, healthy=True) is None


def test_a_producer_waiting_for_a_replica_that_is_not_there_gets_a_clear_error() -> None:
    db = 11
    with flushed_db(db) as store:
        client = Client(Settings(redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", broker_wait_replicas=1,
                                 broker_wait_timeout_ms=20))
        try:
            with pytest.raises(InferqConnectionError, match=r"reached 0 of the 1 replica\(s\)"):
                client.submit_embed(["nobody copies this"])
        finally:
            client.close()
        # it was pushed, and pushed again by each publish retry: what reached the master is there, as the
        # README says (a send that timed out can run more than once)
        assert store.llen("embed") >= 1
