"""The gateway's Prometheus metrics (``GET /metrics``): requests, errors by type, latency, in flight.

Counted by an ASGI middleware around the whole app, so a request refused before its route (a bad key, an
unknown path) is counted too, and a streamed response is timed to its last event. Labels stay few: the
route (known routes by name, anything else "other"), the API key's name (never the key) and the status;
errors add their OpenAI type. Each gateway process has a registry of its own: several processes behind a
load balancer are scraped, and summed, separately.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

ROUTES = ("/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/classify",
          "/v1/models", "/health", "/metrics")
# Seconds: from a cached /v1/models (under a millisecond) to a long generation (minutes).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("inferq_gateway_requests", "Requests answered, by route, API key name and status",
                                ["route", "key", "status"], registry=self.registry)
        self.errors = Counter("inferq_gateway_errors", "Requests answered with an error, by route and error type",
                              ["route", "type"], registry=self.registry)
        self.latency = Histogram("inferq_gateway_request_seconds", "Seconds from a request to its response's last "
                                 "byte, by route", ["route"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("inferq_gateway_in_flight", "Requests being answered now, by route", ["route"],
                               registry=self.registry)
        self.streams_open = Gauge("inferq_gateway_streams_open", "Streamed generations open now (each holds a "
                                  "Redis connection; gateway.max_streams bounds them)", registry=self.registry)
        self.refused = Counter("inferq_gateway_admission_refused", "Requests refused with 429 because their "
                               "queue was deeper than gateway.max_queue_depth, by kind", ["kind"],
                               registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, address: str, port: int | None) -> WSGIServer | None:
        """Serve these metrics without a key on ``port`` (for Prometheus, which cannot send one it does not
        hold in a file) in a thread, until the server returned is shut down; nothing without a port."""
        if port is None:
            return None
        try:
            server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve the gateway's metrics on {address}:{port} "
                              f"(INFERQ_GATEWAY__METRICS_PORT): {exc}") from exc
        return server


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


class MetricsMiddleware:
    """Counts every HTTP request the app answers. A route records the caller's key name and an error's type
    in the request's state (``key_name``, ``error_type``), which this reads once the response is done."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(scope.get("path", ""))
        scope.setdefault("state", {})
        status = 500  # a response that never started: the app failed, or the client went away first
        started = time.perf_counter()

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        gauge = self.metrics.in_flight.labels(route)
        gauge.inc()
        try:
            await self.app(scope, receive, counted_send)
        finally:
            gauge.dec()
            state = scope["state"]
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, state.get("key_name", "none"), str(status)).inc()
            if status >= 400 or "error_type" in state:
                self.metrics.errors.labels(route, state.get("error_type", f"http_{status}")).inc()
