"""The worker's message consumer: messages that are not valid inferq tasks never run and never crash it.

Celery already refuses any content type but JSON without decoding it (so a pickled payload is never
unpickled), and acknowledges what it cannot decode so it is not redelivered forever. This consumer adds
what a caller needs: the refusal is counted (``inferq_status``'s ``refused`` counts), logged in one line,
and, where the task id can be read from the headers, stored under that id as an ``InvalidMessage``
failure, so the caller's ``get()`` raises instead of waiting forever.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

from producer.contract import task_name
from producer.errors import InvalidMessage
from producer.settings import KINDS
from workers.receiving.counters import SharedCounter
from workers.receiving.envelopes import triple_problem

log = logging.getLogger(__name__)

_refused = SharedCounter()


def refused_counts() -> dict[str, int]:
    return _refused.snapshot()


def count_refused(reason: str) -> None:
    _refused.add(reason)


def _undecodable(message: Any, exc: Exception) -> str:
    return (f"the message could not be decoded ({type(exc).__name__}: {exc}); inferq accepts only JSON task "
            f"messages (content type {message.content_type!r})")


# Kombu's reconnection waits 2 s after the first failed round of the broker's URLs, then 2 s more each round,
# up to 30 s, and Celery gives no setting for it. A Sentinel failover takes about 2 s (tests/test_sentinel_drill.py:
# the worker came back 6.2 s after the master's loss with Kombu's steps); so do short Redis restarts.
RECONNECT_INTERVALS = {"interval_start": 0.25, "interval_step": 0.25, "interval_max": 2.0}


def _body_problem(message: Any) -> str | None:
    try:
        body = message.decode()  # kept by the message: Celery's request does not decode it again
    except Exception:  # Celery refuses what it cannot decode, and counts it (on_invalid_task)
        return None
    return triple_problem(body)


def _too_late(headers: Any, horizon: float) -> str | None:
    """Why a message's ETA (countdown) is further ahead than a worker may hold it; None when it is not. A
    worker holds an ETA message unacknowledged until it is due; held past the visibility timeout, Redis hands
    it out again, to be held twice, then three times, each copy run at the ETA. A malformed ETA Celery refuses."""
    eta = headers.get("eta") if isinstance(headers, dict) else None
    if not isinstance(eta, str):
        return None
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)  # Celery writes UTC
    ahead = (due - datetime.now(UTC)).total_seconds()
    if ahead <= horizon:
        return None
    return (f"its eta is {ahead:.0f} s ahead; a worker holds a message at most {horizon:g} s (half the "
            "visibility timeout) before running it: held longer, Redis hands it out again, and it runs twice")


class InferqConsumer(Consumer):  # type: ignore[misc]
    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT_INTERVALS)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the connection's own method again

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        passes = tuple(self.connection_errors) + tuple(self.channel_errors) + (MemoryError,)
        fast = getattr(self.app, "inferq_fast_path", None)
        direct: dict[Any, Any] = fast.direct if fast is not None else {}
        ours = {task_name(kind) for kind in KINDS}
        horizon = float(self.app.conf.broker_transport_options.get("visibility_timeout", 3600)) / 2

        def on_task_received(message: Any) -> Any:
            try:
                headers = message.headers
                name = headers.get("task") if type(headers) is dict else None
                take = direct.get(name)
                # (with per-message callbacks registered, the autoscaler's, every message goes Celery's way)
                if take is not None and not self.on_task_message and take(message):
                    return None  # an ordinary message of ours: the fast path took it
                if name in ours and (problem := _body_problem(message)) is not None:
                    # Celery's own path would acknowledge it unanswered, or fail it in the pool where nothing
                    # is stored nor acknowledged and it comes back every visibility timeout
                    self._refuse(message, "invalid_task", f"the task message is malformed: {problem}; the body "
                                                          "must be [args, kwargs, embed]")
                    message.reject_log_error(log, self.connection_errors)
                    return None
                if name in ours and (late := _too_late(headers, horizon)) is not None:
                    self._refuse(message, "eta_too_far", late)
                    message.reject_log_error(log, self.connection_errors)
                    return None
                return handle(message)
            except passes:
                raise  # the consumer reconnects on these
            except Exception as exc:
                # Celery unpacks the body while building its request and lets e.g. the ValueError of a body
                # that is not an (args, kwargs, embed) triple escape, which stops the whole consumer.
                self._refuse(message, "invalid_task", f"the task message is malformed ({type(exc).__name__}: "
                                                      f"{exc}); the body must be [args, kwargs, embed]")
                if not message.acknowledged:
                    message.reject_log_error(log, self.connection_errors)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse(message, "undecodable", _undecodable(message, exc))
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "not_a_task", "the message is not a Celery task message (no task name in its headers)")
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        # Celery stores NotRegistered, whose message is a list (["inferq.nope"]), logs a traceback, and
        # names no task that would do; this says which ones exist, as the other refusals do.
        headers = message.headers if isinstance(message.headers, dict) else {}
        payload = body if isinstance(body, dict) else {}  # a protocol-1 message names it in its body
        name = headers.get("task") or payload.get("task") or (exc.args[0] if exc.args else None)
        self._refuse(message, "unknown_task", f"no task is named {name!r}; this worker runs "
                                              f"{', '.join(task_name(kind) for kind in KINDS)}",
                     headers.get("id") or payload.get("id"))
        message.reject_log_error(log, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        # A protocol-2 message is decoded only when its task runs: a foreign content type (pickle, yaml)
        # raises ContentDisallowed there, before any decoding, and broken JSON a DecodeError.
        if isinstance(exc, ContentDisallowed | DecodeError):
            self._refuse(message, "undecodable", _undecodable(message, exc))
        else:
            self._refuse(message, "invalid_task", f"the task message is malformed ({type(exc).__name__}: {exc})")
        message.reject_log_error(log, self.connection_errors)

    def _refuse(self, message: Any, reason: str, text: str, task_id: Any = None) -> None:
        count_refused(reason)
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = task_id or headers.get("id")
        log.error("refused a message (%s): %s; task id %s, task %s", reason, text, task_id, headers.get("task"))
        if isinstance(task_id, str) and task_id:
            try:
                self.app.backend.mark_as_failure(task_id, InvalidMessage(text))
            except Exception:  # a failed store must not stop the consumer; the log line stands
                log.exception("could not store the InvalidMessage failure for task %s", task_id)
