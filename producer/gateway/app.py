"""The gateway's ASGI app: OpenAI routes over inferq tasks, API keys, and errors in OpenAI's shape.

Routes: ``POST /v1/embeddings``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST
/v1/responses`` (the three streamed as server-sent events with ``stream: true``), ``GET /v1/models`` (the
aliases the live workers serve), and inferq's own ``POST /v1/classify``, ``GET /health`` and ``GET /metrics``.
Every request is validated as the task contract says before it is sent, so bad input never reaches a worker;
a request whose queue is over ``gateway.max_queue_depth``, or a streamed one past ``gateway.max_streams`` open
in this process, is refused with 429 before anything is sent (``admission.py``). A streamed request whose
client goes away is cancelled (``Client.cancel``): its generation stops.

Stateless: every gateway process holds only its Redis connections, so several run behind a load balancer.
Calls that wait on Redis (sending a task, the workers' status) run in threads, never on the event loop.
Errors a retry cannot mend (a timeout whose task still runs, a poison message, a request too large for the
device, a cancel) carry ``x-should-retry: false``, which the OpenAI SDKs obey: their default retries of
5xx statuses would otherwise send the same work again behind the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.client import Client, FutureHandle, Handle
from producer.contract import Lane
from producer.errors import (
    Cancelled,
    InferqConnectionError,
    InferqError,
    InputTooLarge,
    InvalidInput,
    OutOfMemory,
    PoisonMessage,
    ResultTimeout,
    StreamRestarted,
    TaskTimeout,
    UnknownModel,
)
from producer.gateway import shapes
from producer.gateway.admission import Admission, QueueFull, StreamsFull, StreamSlots
from producer.gateway.closing import Closing, Stopping
from producer.gateway.loopback import LoopbackOnly
from producer.gateway.metrics import GatewayMetrics, MetricsMiddleware
from producer.gateway.request_ids import RequestIds, request_id_of
from producer.gateway.responses import ResponsesRoute
from producer.gateway.results import ResultWaiter
from producer.gateway.served import ServedKinds
from producer.health import check_workers, verdict
from producer.inventory import worker_statuses
from producer.settings import Kind, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
STATUS_TIMEOUT_S = 1.0  # how long one broadcast waits for the workers' status replies
STATUS_REFRESH_S = 5.0  # how often the workers are asked what they serve (GET /v1/models, the 503 check)
STATUS_REMEMBER_S = 30.0  # how long a worker that stopped answering still counts as serving its kinds
HEALTH_TIMEOUT_S = 1.0  # how long GET /health waits for the workers' check replies
SHUTDOWN_CANCELS_S = 5.0  # at shutdown, how long the cancels of generations nobody reads may take to be sent
LARGE_BODY = 256 * 1024  # bytes: a body over this is decoded and checked off the event loop
HEALTH_CACHE_S = 5.0  # a load balancer probing every second costs the workers one check per 5 s


def loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the body is not valid JSON ({exc})", "invalid_request_error") from None


class GatewayError(Exception):
    """An error answered in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None,
                 param: str | None = None, retry: bool = True, still_running: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.retry = status, kind, code, param, retry
        self.still_running = still_running  # the task it answers for may still run (see still_runs)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = dict(headers or {})
        if not self.retry:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def from_task_error(exc: InferqError) -> GatewayError:
    """Our typed errors as OpenAI's: their message kept, the status a client and its SDK act on."""
    name = type(exc).__name__
    if isinstance(exc, UnknownModel):
        return GatewayError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, InvalidInput | InputTooLarge | OutOfMemory):  # OutOfMemory: too large even alone
        return GatewayError(400, str(exc), "invalid_request_error", name)
    if isinstance(exc, ResultTimeout | TaskTimeout):
        return GatewayError(504, str(exc), "timeout", name, retry=False)
    if isinstance(exc, InferqConnectionError):
        return GatewayError(503, str(exc), "service_unavailable", name)
    if isinstance(exc, Cancelled):
        return GatewayError(409, str(exc), "cancelled", name, retry=False)
    return GatewayError(500, str(exc), "server_error", name, retry=not isinstance(exc, PoisonMessage))


def from_failure(exc: Exception) -> GatewayError:
    """Any error met waiting for a request's answer, once it was sent. Redis lost after the send is a 503
    a retry must not follow: the task is queued and may still run. An error that is not inferq's is the
    task's own (Celery rebuilds a worker's RuntimeError, or a revoke, as such): the task failed, a retry would
    run it again."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, InferqConnectionError):
        error = GatewayError(503, f"{exc}; the request was sent and may still run", "service_unavailable",
                             type(exc).__name__, retry=False)
    elif isinstance(exc, InferqError):
        error = from_task_error(exc)
    else:
        log.warning("a request failed with %s: %s (taken as its task's failure)", type(exc).__name__, exc)
        error = GatewayError(500, f"the task failed: {type(exc).__name__}: {exc}", "server_error",
                             type(exc).__name__, retry=False)
    error.still_running = isinstance(exc, InferqError) and still_runs(exc)  # else: the task failed, it is over
    return error


def still_runs(exc: BaseException) -> bool:
    """Whether a generation whose answer met ``exc`` may still be decoding: all but the task's own errors (and
    its result's), which it reported as it ended."""
    if isinstance(exc, GatewayError):
        return exc.still_running
    return (not isinstance(exc, InferqError)
            or isinstance(exc, ResultTimeout | InferqConnectionError | StreamRestarted))


def create_app(settings: Settings, open_access: bool = False, client: Client | None = None) -> FastAPI:
    """The app. Without API keys it runs only with ``open_access`` (the caller checks it listens on loopback)."""
    keys = {name: key.get_secret_value() for name, key in settings.gateway.api_keys.items()}
    if not keys and not open_access:
        raise ValueError("the gateway has no API keys (INFERQ_GATEWAY__API_KEYS); set some, or run it open on "
                         "loopback")
    queue = client or Client(settings)
    gate = Admission(settings.broker, settings.gateway.max_queue_depth, settings.gateway.queue_depth_cache_ms / 1000,
                     settings.gateway.retry_after_s, settings.connect_timeout, settings.sentinel_master)
    metrics = GatewayMetrics()
    slots = StreamSlots(settings.gateway.max_streams, settings.gateway.retry_after_s)
    metrics.streams_open.set_function(lambda: slots.open)
    waiter = ResultWaiter(queue.app.backend, settings.backend, settings.connect_timeout, settings.sentinel_master)
    cancels = Cancels(queue)
    closing = Closing()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        exposition = metrics.serve(settings.gateway.metrics_address, settings.gateway.metrics_port)
        try:
            await served.start()
            yield
        finally:
            if exposition is not None:
                await asyncio.to_thread(exposition.shutdown)  # it waits for the server's next poll
                exposition.server_close()
        await cancels.settle(SHUTDOWN_CANCELS_S)
        await served.stop()
        await gate.close()
        await waiter.close()

    app = FastAPI(title="inferq gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.closing = closing  # set by GatewayServer shortly before its shutdown grace is over
    default_model = settings.models.default_alias("generate") or "default"  # what a chunk names without one
    served = ServedKinds(lambda: worker_statuses(queue, STATUS_TIMEOUT_S), STATUS_REFRESH_S, STATUS_REMEMBER_S)
    checked: dict[str, Any] = {"at": -HEALTH_CACHE_S, "data": None}
    if not keys:
        # Open on loopback: a web page in the user's browser must not reach it. A cross-site form post is
        # never application/json, and a DNS-rebound name is not a loopback host.
        app.add_middleware(LoopbackOnly, refusal=lambda host: GatewayError(
            400, f"the gateway runs without API keys and answers only requests to a loopback host, not {host!r}",
            "invalid_request_error", "invalid_host", retry=False).response())
    app.add_middleware(RequestIds)  # each response names its task (x-request-id), errors included
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it counts what the host check refuses

    def caller(request: Request) -> str:
        """The name of the key the request carries ("open" without keys); GatewayError 401 otherwise."""
        if not keys:
            request.state.key_name = "open"
            return "open"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        for name, key in keys.items():
            if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), key.encode()):
                request.state.key_name = name
                return name
        raise GatewayError(401, "a valid API key is needed: Authorization: Bearer <key>", "invalid_request_error",
                           "invalid_api_key")

    max_body = int(settings.gateway.max_body_mb * 2**20)

    def too_large() -> GatewayError:
        return GatewayError(413, f"the body is over {settings.gateway.max_body_mb:g} MiB "
                                 "(INFERQ_GATEWAY__MAX_BODY_MB)", "invalid_request_error")

    async def parsed(request: Request, shape: type[Any]) -> Any:
        """The request's body as ``shape``; a large one decoded and checked in a thread, not on the event
        loop (a 5 MB body of wrong items held the loop for seconds while its errors were listed)."""
        data = await body_of(request)
        if len(data) <= LARGE_BODY:
            return shapes.parse(shape, loads(data))
        return await asyncio.to_thread(lambda: shapes.parse(shape, loads(data)))

    async def body_of(request: Request) -> bytes:
        caller(request)
        if not keys and not request.headers.get("content-type", "").startswith("application/json"):
            raise GatewayError(415, "send the body as application/json", "invalid_request_error")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise too_large()
        chunks, size = [], 0
        async for chunk in request.stream():  # a body sent without its length is counted as it comes
            size += len(chunk)
            if size > max_body:
                raise too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def answer(request: Request, error: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
        request.state.error_type = error.code or error.kind
        return error.response(headers)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(InferqError)
    async def task_error(request: Request, exc: InferqError) -> JSONResponse:
        return answer(request, from_task_error(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        metrics.refused.labels(exc.kind).inc()
        return answer(request, GatewayError(429, str(exc), "rate_limit_error", "queue_full"),
                      {"retry-after": str(exc.retry_after)})

    @app.exception_handler(StreamsFull)
    async def streams_full(request: Request, exc: StreamsFull) -> JSONResponse:
        return answer(request, GatewayError(429, str(exc), "rate_limit_error", "too_many_streams"),
                      {"retry-after": str(exc.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer(request, GatewayError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this outside every middleware of ours: the request id is added here
        request_id = request_id_of(request.scope)
        log.exception("the gateway failed on request %s", request_id)
        return answer(request, GatewayError(500, f"the gateway failed: {type(exc).__name__}", "server_error"),
                      {"x-request-id": request_id})

    async def result_of(handle: Handle[Any]) -> Any:
        """A task's result, told by pub/sub; a coalesced call's comes from its shared message's."""
        try:
            if isinstance(handle, FutureHandle):
                return await handle.wait()
            return await waiter.wait(handle.id, settings.result_timeout)
        except Exception as exc:
            raise from_failure(exc) from None

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        # nginx's 499 (client closed request), for the metrics: nobody reads the answer
        return answer(request, GatewayError(499, str(exc), "client_gone", retry=False))

    async def admit(kind: Kind, lane: Lane) -> None:
        """429 while the kind's queue (of the request's lane) is over its limit; 503 while no live worker
        serves the kind."""
        await gate.admit(kind, lane)
        if not served.serves(kind):
            raise GatewayError(503, f"no live worker serves {kind} (none has said so for {STATUS_REMEMBER_S:g} s); "
                               f"start one with `inferq worker --kinds {kind}`", "service_unavailable", "no_worker")

    async def send(request: Request, kind: Kind, body: shapes.OpenAIBody, kwargs: dict[str, Any]) -> Handle[Any]:
        """Admit the request, then enqueue it on its lane (in a thread: a send waits on Redis)."""
        lane = body.lane()
        await admit(kind, lane)
        handle = await asyncio.to_thread(queue.submit, kind, priority=lane, **kwargs)
        if not isinstance(handle, FutureHandle):  # a coalesced call shares a message: it has no task of its own
            request.state.task_id = handle.id  # its x-request-id
        return handle

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = await parsed(request, shapes.EmbeddingsBody)
        handle = await send(request, "embed", body, shapes.embed_kwargs(body))
        result = await result_of(handle)
        return Response(orjson.dumps(shapes.embeddings_response(result, body.encoding_format or "float")),
                        media_type="application/json")

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        """inferq's classify task over HTTP (not an OpenAI route): labels and scores per input text."""
        body = await parsed(request, shapes.ClassifyBody)
        handle = await send(request, "classify", body, shapes.classify_kwargs(body))
        return Response(orjson.dumps(shapes.classify_response(await result_of(handle))), media_type="application/json")

    async def generate(request: Request, route: shapes.GenerateRoute) -> Any:
        body: Any = await parsed(request, route.shape)
        kwargs = route.kwargs(body)
        if not body.stream:
            handle = await send(request, "generate", body, kwargs)
            try:
                result = await unless_gone(request, result_of(handle))
            except BaseException as exc:  # given up (a timeout, the client gone): nobody will read it
                if still_runs(exc):
                    cancels.soon(handle.id)
                raise
            return route.answer(handle.id, body, result)
        release = slots.take()  # StreamsFull (429) before anything is sent
        try:
            lane = body.lane()
            await admit("generate", lane)
            stream = await asyncio.to_thread(queue.stream_generate, priority=lane, **kwargs)
        except BaseException:
            release()
            raise
        request.state.task_id = stream.id
        slots.tie(stream, release)
        pieces = aiter(stream)
        try:  # the first piece before the response starts: an error before it still gets its own status
            first: str | None = await unless_gone(request, anext(pieces))
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            release()
            if still_runs(exc):
                cancels.soon(stream.id)
            if isinstance(exc, Exception) and not isinstance(exc, ClientGone):
                raise from_failure(exc) from None
            raise
        events = _events(stream, pieces, first, route.events(stream.id, body), cancels, closing, release)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    max_new_tokens = settings.limits.max_new_tokens
    chat_route = shapes.CompletionRoute(True, max_new_tokens, default_model)
    completion_route = shapes.CompletionRoute(False, max_new_tokens, default_model)
    responses_route = ResponsesRoute(max_new_tokens, default_model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat_route)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, completion_route)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        return await generate(request, responses_route)

    def served_models() -> dict[str, dict[str, Any]]:
        """The aliases the live workers serve, as OpenAI's model objects."""
        aliases: dict[str, set[str]] = {}
        for status in served.statuses():
            for kind, group in (status.get("models") or {}).items():
                for alias in group:
                    aliases.setdefault(alias, set()).add(kind)
        return {alias: {"id": alias, "object": "model", "created": 0, "owned_by": "inferq", "kinds": sorted(kinds)}
                for alias, kinds in sorted(aliases.items())}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        caller(request)
        return {"object": "list", "data": list(served_models().values())}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict[str, Any]:
        caller(request)
        found = served_models().get(name)
        if found is None:
            raise GatewayError(404, f"no live worker serves a model named {name!r}", "invalid_request_error",
                               "model_not_found", "model")
        return found

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while at least one worker answers a check (a tiny request through each of its models) and
        none fails it; 503 otherwise. No key needed: a load balancer probes it, and it names only workers."""
        now = time.monotonic()
        if now - checked["at"] >= HEALTH_CACHE_S:
            try:
                found = await asyncio.to_thread(check_workers, queue, timeout=HEALTH_TIMEOUT_S)
                checked["data"] = {"workers": [{"node": h.node, "ok": h.ok, "detail": h.detail} for h in found],
                                   "problem": verdict(found, (), 1)}
            except InferqConnectionError as exc:
                checked["data"] = {"workers": [], "problem": str(exc)}
            checked["at"] = now
        report = checked["data"]
        status = "ok" if report["problem"] is None else "unavailable"
        return JSONResponse({"status": status, **report}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics_page(request: Request) -> Response:
        caller(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.state.client = queue
    return app


async def unless_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, unless the client goes away first: then ClientGone, and it is cancelled. A
    request's body is read by then, so what the server sends next on ``receive`` is the disconnect."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_until_gone(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone("the client closed its connection before the answer")


async def _until_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Cancels:
    """Generations to stop, each cancelled from a thread (a cancel waits on Redis), not waited for where it is
    asked: that runs where its caller is being cancelled, and any await there would be cancelled again. The
    gateway's shutdown waits for them, and cancels the streams still open: once its grace is over uvicorn
    cancels their tasks and then re-raises SIGTERM, which ended the process before a cancel asked in a
    stream's last moments had been sent (or before a stream cancelled while it was writing was closed at all)."""

    def __init__(self, queue: Client) -> None:
        self._queue = queue
        self._pending: set[asyncio.Future[None]] = set()
        self.streaming: set[str] = set()  # task ids of the streams open now

    def soon(self, task_id: str) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, self._cancel, task_id)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def settle(self, timeout: float) -> None:
        """At shutdown: cancel the streams still open, and wait for every cancel under way."""
        for task_id in list(self.streaming):
            log.info("the gateway stops with the stream of %s open; cancelling it", task_id)
            self.soon(task_id)
        self.streaming.clear()
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    def _cancel(self, task_id: str) -> None:
        try:
            self._queue.cancel(task_id)
        except InferqError as exc:
            log.warning("could not cancel %s (%s)", task_id, exc)


async def _events(stream: Any, pieces: AsyncIterator[str], first: str | None, written: shapes.StreamEvents,
                  cancels: Cancels, closing: Closing, release: Callable[[], None]) -> AsyncIterator[bytes]:
    """A streamed generation as server-sent events, as its route writes them, from its first piece (read before
    the response started) on; the generation is cancelled if the client goes away, or the gateway stops
    first. Its slot among the open streams is released at the end."""
    finished = False
    cancels.streaming.add(stream.id)
    try:
        for event in written.opening(first):
            yield event
        while True:
            try:
                piece = await closing.next_of(pieces)
            except StopAsyncIteration:
                break
            except Stopping:
                raise GatewayError(503, "the gateway is stopping; this generation is cancelled, send it again",
                                   "service_unavailable", still_running=True) from None
            yield written.piece(piece)
        finished = True  # the generation is over: a client gone now leaves nothing to cancel
        for event in written.ending(stream):
            yield event
    except Exception as exc:  # mid-stream the status is sent already: the error is the last event
        finished = not still_runs(exc)  # a timeout, a lost Redis, a restart leave it running: cancel it
        if not isinstance(exc, InferqError | GatewayError):
            log.error("stream %s failed: %s: %s", stream.id, type(exc).__name__, exc)
        for event in written.failure(from_failure(exc).body()["error"]):
            yield event
    finally:
        release()
        cancels.streaming.discard(stream.id)
        if not finished:  # the client went away (the response was cancelled), or gave up: stop its generation
            log.info("the client of %s is gone; cancelling it", stream.id)
            cancels.soon(stream.id)
