"""Celery's Sentinel result backend, finding the master as ``redis_clients.Sentinel`` does: at once after a
failover, where redis-py's own discovery names the old master for seconds more (see that class)."""

from __future__ import annotations

from typing import Any

from celery.backends.redis import SentinelBackend as CelerySentinelBackend

from producer.redis_clients import Sentinel


class SentinelBackend(CelerySentinelBackend):  # type: ignore[misc]
    def _get_sentinel_instance(self, **params: Any) -> Sentinel:
        connparams = dict(params)
        hosts = connparams.pop("hosts")
        return Sentinel([(host["host"], host["port"]) for host in hosts],
                        min_other_sentinels=self._transport_options.get("min_other_sentinels", 0),
                        sentinel_kwargs=self._transport_options.get("sentinel_kwargs", {}), **connparams)


# Celery's loader picks these over its own backends by URL scheme (app.loader.override_backends)
OVERRIDES = {"sentinel": "producer.result_backend:SentinelBackend"}
