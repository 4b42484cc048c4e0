"""Every gateway response carries ``x-request-id``, as OpenAI's do (the SDK shows it as ``_request_id``, and
puts it in the errors it raises): the inferq task id where the request sent a task, so that one request can
be followed to its task (in Flower, ``inferq`` commands, ``Client.handle``), cancelled, or its stream read;
a fresh id otherwise. A route names its task in the request's state (``task_id``) once it is sent."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":  # the id replaces any a route set
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id_of(scope).encode())]}
            await send(message)

        await self.app(scope, receive, with_id)


def request_id_of(scope: Scope) -> str:
    """The request's id: its task's once sent, else one made for it (and kept: the same id all along)."""
    state = scope.setdefault("state", {})
    return str(state.get("task_id") or state.setdefault("request_id", f"req_{uuid.uuid4().hex}"))
