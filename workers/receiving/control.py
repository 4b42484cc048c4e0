"""Remote-control commands: ``inferq_status`` (what this worker loaded, where, how busy) and ``inferq_check``
(a tiny inference through every model, for health checks)."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from workers.device.runtime import Runtime
from workers.receiving.consumer import refused_counts
from workers.receiving.deliveries import redelivery_counts
from workers.receiving.fastpath import path_counts

_runtime: Runtime | None = None


def publish(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


@control_command()  # type: ignore[untyped-decorator]
def inferq_status(state: Any) -> dict[str, Any]:
    if _runtime is None:
        return {"ready": False}
    return {**_runtime.describe(), "refused": refused_counts(), **redelivery_counts(), "paths": path_counts()}


@control_command()  # type: ignore[untyped-decorator]
def inferq_check(state: Any) -> dict[str, Any]:
    if _runtime is None:
        return {"ok": False, "error": "the models are not loaded yet"}
    try:
        return _runtime.self_test()
    except Exception as exc:
        # A health check reports any failure instead of raising it: TaskTimeout when the device loop is stuck
        # or far behind, OutOfMemory when the device cannot serve, a CUDA error when the GPU fell off the bus.
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
