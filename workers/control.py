"""A remote-control command, ``inferq_status``: which models this worker loaded, where, how often."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from workers.runtime import Runtime

_runtime: Runtime | None = None


def publish(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


@control_command()  # type: ignore[untyped-decorator]
def inferq_status(state: Any) -> dict[str, Any]:
    if _runtime is None:
        return {"ready": False}
    return _runtime.describe()
