"""A receiving process's handle on its device process: the same ``submit`` as a local device loop.

Each prepared request gets a future here at once; a sender thread sends everything submitted since its
last send in one message, and a reader thread resolves the futures from the outcomes that come back (the
wire protocol is in workers/device/server.py). Nothing waits on a batch-mate here: the device process
does the batching, across every receiver it serves.

If the device process goes away, this process exits at once with code 70 and without acknowledging
anything: what it held goes back to the queue after the visibility timeout, and the launcher restarts the
device process and its receivers. Answering each held message with an error instead would lose them.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np
import torch

from workers.device import WIRE_VERSION, hang_up
from workers.device.jobs import Progress
from workers.device.stall import EXIT_DEVICE_FAILED
from workers.errors import WorkerError
from workers.exits import hard_exit

log = logging.getLogger(__name__)
# How long held submits wait for the consumer's flush at most (it normally comes within microseconds).
HOLD_MAX_S = 0.002


class DeviceProcessUnreachable(WorkerError):
    """No device process answered at the address within the wait."""


class RemoteDevice:
    # what the stall watch reads on a local loop; the device process watches its own device
    busy_since: float | None = None
    died = False
    # what the outcomes of one reply are resolved inside (``Runtime.answer_together``)
    answering: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext

    def __init__(self, address: str, authkey: bytes, wait_s: float,
                 exited: Callable[[], int | None] = lambda: None) -> None:
        self.address = address
        self._conn, self.hello = _connect(address, authkey, wait_s, exited)
        self._ids = itertools.count()
        self._futures: dict[int, Future[Any]] = {}
        self._ids_of: dict[Future[Any], int] = {}  # for cancel
        self._progress: dict[int, Progress] = {}
        self._waiting: collections.deque[tuple[Any, ...]] = collections.deque()
        self._send_at = 0.0  # when what is waiting must go (monotonic): now, or the end of a hold
        self._wake = threading.Condition()
        self._closing = False
        self._held = threading.local()
        # how well hand-offs batch: requests sent, and the sends that carried them (inferq_status)
        self.sent = {"requests": 0, "sends": 0}
        threading.Thread(target=self._send_loop, name="inferq-device-sender", daemon=True).start()
        threading.Thread(target=self._read_loop, name="inferq-device-reader", daemon=True).start()

    def submit(self, key: str, payload: Any, items: int, longest: int, timeout: float,
               progress: Progress | None = None, priority: int = 0) -> Future[Any]:
        future: Future[Any] = Future()
        now = time.monotonic()
        with self._wake:
            request_id = next(self._ids)
            self._futures[request_id] = future
            self._ids_of[future] = request_id
            if progress is not None:
                self._progress[request_id] = progress
            # the deadline travels as the time left when sent: the device process's clock starts then
            self._waiting.append((request_id, key, payload, items, longest, now + timeout, progress is not None,
                                  priority))
            if not getattr(self._held, "on", False):
                self._send_at = now
                self._wake.notify()
            elif len(self._waiting) == 1:
                # the first of a held group: sent at the flush, or after HOLD_MAX_S if no flush comes (a
                # consumer stopping between turns of its loop must not strand what it prepared)
                self._send_at = now + HOLD_MAX_S
                self._wake.notify()
        return future

    def hold_this_thread(self) -> None:
        """From now on, submits from this thread wait for the next ``flush()`` instead of waking the sender:
        the consumer prepares every message of a take, then flushes once (at its event loop's next turn),
        so they go to the device process in one send. Without it the sender woke for each message and sent 3
        requests per send on average (20,000-message backlog, one receiver)."""
        self._held.on = True

    def flush(self) -> None:
        with self._wake:
            if self._waiting:
                self._send_at = time.monotonic()
                self._wake.notify()

    def cancel(self, future: Future[Any]) -> None:
        """Ask the device process to give up on a request (``DeviceLoop.cancel``); its answer comes back as
        any other, a Cancelled failure unless it had finished."""
        with self._wake:
            request_id = self._ids_of.get(future)
            if request_id is None:
                return  # answered already
            self._waiting.append(("cancel", request_id))  # after its submit, if that is still waiting
            self._send_at = time.monotonic()
            self._wake.notify()

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The device process's batch sizes and counters (for ``inferq_status``)."""
        future: Future[Any] = Future()
        with self._wake:
            request_id = next(self._ids)
            self._futures[request_id] = future
            self._waiting.append(("stats", request_id))
            self._send_at = time.monotonic()
            self._wake.notify()
        result: dict[str, Any] = future.result(timeout=timeout)
        return result

    def stop(self) -> None:
        self._closing = True
        with self._wake:
            self._wake.notify()
        hang_up(self._conn)  # wakes the reader blocked on it; the device process sees its receiver leave
        self._conn.close()

    def _send_loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closing and (not self._waiting or time.monotonic() < self._send_at):
                        self._wake.wait(timeout=max(0.0, self._send_at - time.monotonic()) if self._waiting
                                        else None)
                    if self._closing:
                        return
                    waiting, self._waiting = list(self._waiting), collections.deque()
                now = time.monotonic()
                submits = [(rid, key, payload, items, longest, deadline - now, progress, priority)
                           for rid, key, payload, items, longest, deadline, progress, priority in
                           (item for item in waiting if not isinstance(item[0], str))]
                if submits:
                    self._conn.send(("submit", submits))
                    self.sent["requests"] += len(submits)
                    self.sent["sends"] += 1
                for item in waiting:
                    if isinstance(item[0], str):  # ("stats", id), ("cancel", id): after the submits
                        self._conn.send(item)
        except Exception as exc:  # a lost socket, or anything else: never leave requests waiting forever
            self._lost(exc)

    def _read_loop(self) -> None:
        while True:
            try:
                tag, body = self._conn.recv()
            except Exception as exc:  # EOF or a reset, or an outcome that cannot be unpickled here
                self._lost(exc)
                return
            if tag == "stats":
                request_id, stats = body
                self._resolve(request_id, True, stats)
                continue
            if tag == "progress":
                for request_id, produced in body:
                    listener = self._progress.get(request_id)
                    if listener is not None:
                        try:
                            listener(produced)
                        except Exception:  # the listener's fault: the request still gets its answer
                            log.exception("a progress listener failed")
                continue
            try:
                with self.answering():
                    for request_id, ok, value in unpack_outcomes(body):
                        self._resolve(request_id, ok, value)
            except Exception as exc:  # a reply this process cannot read: never leave its requests waiting
                self._lost(exc)
                return

    def _resolve(self, request_id: int, ok: bool, value: Any) -> None:
        with self._wake:
            future = self._futures.pop(request_id, None)
            self._progress.pop(request_id, None)
            if future is not None:
                self._ids_of.pop(future, None)
        if future is None or not future.set_running_or_notify_cancel():
            return  # its caller gave up on it (a time limit)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _lost(self, exc: BaseException) -> None:
        if self._closing:
            return
        log.critical("the device process is gone (%s, %s: %s); this worker exits without acknowledging, so its "
                     "messages are handed out again", self.address, type(exc).__name__, exc)
        hard_exit(EXIT_DEVICE_FAILED)


def unpack_outcomes(body: tuple[list[tuple[int, bool, Any, Any]], list[Any]]) -> Iterator[tuple[int, bool, Any]]:
    """A ``done`` reply's outcomes, an encoder's rows as a tensor over its part of the reply's array."""
    outcomes, arrays = body
    stacked = [torch.from_numpy(array) for array in arrays]
    for request_id, ok, value, rows in outcomes:
        if rows is not None:
            yield request_id, ok, stacked[rows[0]][rows[1]:rows[2]]
        else:
            yield request_id, ok, torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _connect(address: str, authkey: bytes, wait_s: float,
             exited: Callable[[], int | None]) -> tuple[Connection, dict[str, Any]]:
    """Connect and read the hello, waiting for a device process that is still loading its models (it
    listens once loaded) or restarting. ``exited``: the device process's exit code if this process started
    it and it has already ended."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            conn = Client(address, "AF_UNIX", authkey=authkey)
            try:
                tag, hello = conn.recv()
            except BaseException:
                conn.close()
                raise
            if tag != "hello":
                conn.close()
                raise DeviceProcessUnreachable(f"the device process at {address} answered {tag!r}, not hello")
            if hello.get("wire", 1) != WIRE_VERSION:
                conn.close()
                raise WorkerError(f"the device process at {address} speaks wire version {hello.get('wire', 1)}, "
                                  f"this worker {WIRE_VERSION}: run both from the same inferq release")
            return conn, hello
        except (FileNotFoundError, ConnectionError, EOFError) as exc:  # not listening yet, or gone mid-handshake
            code = exited()
            if code is not None:
                raise DeviceProcessUnreachable(f"the device process exited with code {code} before it listened "
                                               f"at {address}; its log above says why") from None
            if time.monotonic() > deadline:
                raise DeviceProcessUnreachable(f"no device process listens at {address} after {wait_s:g} s: "
                                               f"{exc}") from None
            if not announced:
                log.info("waiting for the device process at %s", address)
                announced = True
            time.sleep(0.2)
