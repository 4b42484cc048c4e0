"""An example web app that puts inferq behind HTTP: it enqueues, awaits, and returns results.

    pip install -e '.[examples]'          # fastapi + uvicorn, on top of the light producer install
    uvicorn examples.webapp:app --port 8000
    curl -s localhost:8000/v1/embed -H 'content-type: application/json' -d '{"texts": ["hello"]}'

POST /v1/{embed|classify|generate} waits for the result (the task's kwargs are the JSON body);
POST /v1/{kind}/async returns 202 with a task id at once; GET /v1/tasks/{id} polls it.
Bad input answers 422 with the typed error; a result that takes too long 504; Redis down 503.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from producer import Client, InferqConnectionError, InferqError, ResultTimeout, Settings
from producer.settings import KINDS, Kind

app = FastAPI(title="inferq example")
client = Client(Settings())  # one per process: it holds the broker and backend connection pools


@app.exception_handler(InferqError)
async def typed_error(_: Request, exc: InferqError) -> JSONResponse:
    status = 504 if isinstance(exc, ResultTimeout) else 503 if isinstance(exc, InferqConnectionError) else 422
    return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}}, status_code=status)


def _kind(kind: str) -> Kind:
    for known in KINDS:
        if known == kind:
            return known
    raise HTTPException(404, f"no such task kind {kind!r}; the kinds are {', '.join(KINDS)}")


async def _kwargs(request: Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise HTTPException(422, "the body must be a JSON object of the task's kwargs")
    return body


@app.post("/v1/{kind}")
async def run(kind: str, request: Request) -> Any:
    return await client.submit(_kind(kind), **await _kwargs(request)).wait()


@app.post("/v1/{kind}/async", status_code=202)
async def enqueue(kind: str, request: Request) -> dict[str, str]:
    return {"id": client.submit(_kind(kind), **await _kwargs(request)).id}


@app.get("/v1/tasks/{task_id}")
async def poll(task_id: str) -> dict[str, Any]:
    handle = client.handle(task_id)
    if not handle.ready():
        return {"id": task_id, "ready": False}
    return {"id": task_id, "ready": True, "result": handle.get(timeout=5)}
