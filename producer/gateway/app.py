"""The gateway's ASGI app: OpenAI routes over inferq tasks, API keys, and errors in OpenAI's shape.

Routes: ``POST /v1/embeddings``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streamed as
server-sent events with ``stream: true``), ``GET /v1/models`` (the aliases the live workers serve). Every
request is validated as the task contract says before it is sent, so bad input never reaches a worker.
A streamed request whose client goes away is cancelled (``Client.cancel``): its generation stops.

Stateless: every gateway process holds only its Redis connections, so several run behind a load balancer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.client import Client
from producer.errors import (
    Cancelled,
    InferqConnectionError,
    InferqError,
    InputTooLarge,
    InvalidInput,
    ResultTimeout,
    TaskTimeout,
    UnknownModel,
)
from producer.gateway import shapes
from producer.settings import Settings

log = logging.getLogger(__name__)
MODELS_TIMEOUT_S = 1.0  # how long GET /v1/models waits for the workers' replies


class GatewayError(Exception):
    """An error answered in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def from_task_error(exc: InferqError) -> GatewayError:
    """Our typed errors as OpenAI's: their message kept, the status a client and its SDK act on."""
    name = type(exc).__name__
    if isinstance(exc, UnknownModel):
        return GatewayError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, InvalidInput | InputTooLarge):
        return GatewayError(400, str(exc), "invalid_request_error", name)
    if isinstance(exc, ResultTimeout | TaskTimeout):
        return GatewayError(504, str(exc), "timeout", name)
    if isinstance(exc, InferqConnectionError):
        return GatewayError(503, str(exc), "service_unavailable", name)
    if isinstance(exc, Cancelled):
        return GatewayError(409, str(exc), "cancelled", name)
    return GatewayError(500, str(exc), "server_error", name)


def create_app(settings: Settings, open_access: bool = False, client: Client | None = None) -> FastAPI:
    """The app. Without API keys it runs only with ``open_access`` (the caller checks it listens on loopback)."""
    keys = {name: key.get_secret_value() for name, key in settings.gateway.api_keys.items()}
    if not keys and not open_access:
        raise ValueError("the gateway has no API keys (INFERQ_GATEWAY__API_KEYS); set some, or run it open on "
                         "loopback")
    queue = client or Client(settings)
    app = FastAPI(title="inferq gateway", docs_url=None, redoc_url=None)

    def caller(request: Request) -> str:
        """The name of the key the request carries ("open" without keys); GatewayError 401 otherwise."""
        if not keys:
            return "open"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        for name, key in keys.items():
            if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), key.encode()):
                return name
        raise GatewayError(401, "a valid API key is needed: Authorization: Bearer <key>", "invalid_request_error",
                           "invalid_api_key")

    async def body_of(request: Request) -> Any:
        caller(request)
        try:
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"the body is not valid JSON ({exc})", "invalid_request_error") from None

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InferqError)
    async def task_error(_: Request, exc: InferqError) -> JSONResponse:
        return from_task_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return GatewayError(exc.status_code, str(exc.detail), kind).response()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = shapes.parse(shapes.EmbeddingsBody, await body_of(request))
        result = await queue.submit("embed", **shapes.embed_kwargs(body)).wait()
        return Response(orjson.dumps(shapes.embeddings_response(result, body.encoding_format)),
                        media_type="application/json")

    async def generate(request: Request, chat: bool) -> Any:
        raw = await body_of(request)
        if chat:
            body: Any = shapes.parse(shapes.ChatBody, raw)
            kwargs = shapes.chat_kwargs(body)
        else:
            body = shapes.parse(shapes.CompletionBody, raw)
            kwargs = shapes.completion_kwargs(body)
        if not body.stream:
            handle = queue.submit("generate", **kwargs)
            prefix = "chatcmpl-" if chat else "cmpl-"
            result = await handle.wait()
            return shapes.Generation(id=prefix + handle.id, chat=chat).response(result)
        stream = queue.stream_generate(**{key: value for key, value in kwargs.items() if value is not None})
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = _events(stream, shapes.Generation(id=("chatcmpl-" if chat else "cmpl-") + stream.id, chat=chat),
                         include_usage, queue.cancel)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        caller(request)
        replies = await asyncio.to_thread(queue.app.control.broadcast, "inferq_status", reply=True,
                                          timeout=MODELS_TIMEOUT_S)
        aliases: dict[str, set[str]] = {}
        for reply in replies:
            for status in reply.values():
                for kind, group in (status.get("models") or {}).items():
                    for alias in group:
                        aliases.setdefault(alias, set()).add(kind)
        return {"object": "list", "data": [{"id": alias, "object": "model", "created": 0, "owned_by": "inferq",
                                            "kinds": sorted(kinds)} for alias, kinds in sorted(aliases.items())]}

    app.state.client = queue
    return app


def _sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"


async def _events(stream: Any, generation: shapes.Generation, include_usage: bool,
                  cancel: Callable[[str], None]) -> AsyncIterator[bytes]:
    """A streamed generation as OpenAI's server-sent events; the generation is cancelled if the client goes."""
    finished = False
    try:
        model = "pending"
        first = True
        async for piece in stream:
            model = stream.model or model
            yield _sse(generation.chunk(model, piece, first=first))
            first = False
        model = stream.model or model
        if first:  # not a single piece of text (an empty completion): the role still comes first
            yield _sse(generation.chunk(model, first=True))
        yield _sse(generation.chunk(model, finish_reason=stream.finish_reason))
        if include_usage:
            result = {"prompt_tokens": stream.prompt_tokens or 0, "completion_tokens": stream.completion_tokens or 0}
            yield _sse(generation.chunk(model, usage={**result, "total_tokens": sum(result.values())}))
        finished = True
        yield _sse(b"[DONE]")
    except InferqError as exc:  # mid-stream the status is sent already: the error is the last event
        finished = True
        error = from_task_error(exc)
        yield _sse({"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}})
        yield _sse(b"[DONE]")
    finally:
        if not finished:  # the client went away (the response was cancelled): stop its generation
            log.info("the client of %s went away; cancelling it", stream.id)
            cancel(stream.id)
