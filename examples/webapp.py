"""An example web app that puts inferq behind HTTP: it enqueues, awaits, and returns results.

    pip install -e '.[examples]'          # fastapi + uvicorn, on top of the light producer install
    uvicorn examples.webapp:app --port 8000
    curl -s localhost:8000/v1/embed -H 'content-type: application/json' -d '{"texts": ["hello"]}'

POST /v1/{embed|classify|generate} waits for the result (the task's kwargs are the JSON body);
POST /v1/{kind}/async returns 202 with a task id at once; GET /v1/tasks/{id} polls it.
Every error is {"error": {"type": ..., "message": ...}}: bad input (a body that is not a JSON object of the
kind's kwargs, an unknown model, too long an input) 422 with the typed error, an unknown kind or a task id
that is not a UUID 404, a cancelled generation 409, a task or its result that takes too long 504, Redis
down 503, and a task that failed on the worker's side (PoisonMessage, ...) 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from uuid import UUID

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import (
    Cancelled,
    Client,
    InferqConnectionError,
    InferqError,
    InputTooLarge,
    InvalidInput,
    OutOfMemory,
    ResultTimeout,
    Settings,
    TaskTimeout,
    UnknownModel,
)
from producer.contract import validate
from producer.settings import KINDS, Kind

app = FastAPI(title="inferq example")
client = Client(Settings())  # one per process: it holds the broker and backend connection pools


def _error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _status(exc: InferqError) -> int:
    if isinstance(exc, InvalidInput | UnknownModel | InputTooLarge | OutOfMemory):  # OutOfMemory: too big alone
        return 422
    if isinstance(exc, ResultTimeout | TaskTimeout):
        return 504
    if isinstance(exc, InferqConnectionError):
        return 503
    if isinstance(exc, Cancelled):
        return 409
    return 500  # the request was fine and the worker's side failed it: PoisonMessage, ...


@app.exception_handler(InferqError)
async def typed_error(_: Request, exc: InferqError) -> JSONResponse:
    return _error(_status(exc), type(exc).__name__, str(exc))


@app.exception_handler(StarletteHTTPException)  # the app's own 404s, and the framework's 404 and 405
async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, HTTPStatus(exc.status_code).phrase.replace(" ", ""), str(exc.detail),
                  exc.headers)


@app.exception_handler(RequestValidationError)  # the framework's checks of typed parameters
async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors)
    if all(error["loc"][0] == "path" for error in errors):  # a path that names nothing, like an unknown kind
        return _error(404, "NotFound", message)
    return _error(422, "InvalidInput", message)


def _kind(kind: str) -> Kind:
    for known in KINDS:
        if known == kind:
            return known
    raise HTTPException(404, f"no such task kind {kind!r}; the kinds are {', '.join(KINDS)}")


async def _kwargs(kind: Kind, request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:  # json.JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        problem = "is empty" if not await request.body() else f"is not valid JSON ({exc})"
        raise InvalidInput(f"the body {problem}; send a JSON object of the task's kwargs") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object of the task's kwargs")
    sent = {key: value for key, value in body.items() if value is not None}  # what submit() sends
    validate(kind, sent, client.settings.limits)  # first: a key such as "kind" would clash with submit()'s own
    return sent


@app.post("/v1/{kind}")
async def run(kind: str, request: Request) -> Any:
    known = _kind(kind)
    return await client.submit(known, **await _kwargs(known, request)).wait()


@app.post("/v1/{kind}/async", status_code=202)
async def enqueue(kind: str, request: Request) -> dict[str, str]:
    known = _kind(kind)
    return {"id": client.submit(known, **await _kwargs(known, request)).id}


@app.get("/v1/tasks/{task_id}")
async def poll(task_id: UUID) -> dict[str, Any]:
    # The result backend stores a task only once it has finished, so a well-formed id this app never issued
    # looks just like a task still waiting in the queue: it stays {"ready": false}.
    handle = client.handle(str(task_id))
    if not handle.ready():
        return {"id": handle.id, "ready": False}
    return {"id": handle.id, "ready": True, "result": handle.get(timeout=5)}
