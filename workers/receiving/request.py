"""Celery's request for messages on its own path (redelivered ones, ETAs, ``fast_path = false``), with one
change: a message whose outcome the result backend refused to store stays unacknowledged, and leaves the
prefetch window, as on the fast path. The visibility timeout brings it back to run again once Redis takes
writes. Celery's own request acknowledged it with nothing stored (late acknowledgement acknowledges a
failure), and its caller waited for an answer that would never come."""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery.worker.request import Request, task_ready

from workers.errors import ResultNotStored
from workers.receiving.transport import free_room

log = logging.getLogger(__name__)


class InferqRequest(Request):  # type: ignore[misc]
    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if not isinstance(exc, ResultNotStored):
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        task_ready(self)
        log.error("%s; its message stays unacknowledged and comes back after the visibility timeout", exc)
        free_room([self.message])
        return None
