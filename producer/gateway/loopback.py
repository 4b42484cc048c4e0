"""The open gateway's host check. Without API keys the gateway serves only requests addressed to a loopback
name, so that a web page in the user's browser cannot reach it through a DNS-rebound name (a cross-site form
post is refused apart: it is never application/json). Starlette's TrustedHostMiddleware did this, but it
answered in plain text, where an OpenAI client expects its error shape, and read an IPv6 loopback host
("[::1]:8080") as "[", so it refused it."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8080`` is ``::1``, ``localhost:80`` ``localhost``."""
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else header
    return header.split(":", 1)[0]


class LoopbackOnly:
    def __init__(self, app: ASGIApp, refusal: Callable[[str], Response]) -> None:
        self.app = app
        self.refusal = refusal  # the answer to a request addressed to another host, given its Host header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host", "")
        if host_name(header).lower() in LOOPBACK_HOSTS:
            await self.app(scope, receive, send)
            return
        await self.refusal(header)(scope, receive, send)
