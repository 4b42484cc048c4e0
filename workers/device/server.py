"""The device process: the one process per device that holds the models' weights and runs every batch.

Receiving processes (Celery workers) take messages, validate and tokenise them, and send the prepared
requests here over a Unix socket; this process batches them across all its receivers in one device loop
and sends each request's outcome back. CUDA is initialised here only, so no receiver pays for a CUDA
context or contends for the device, and no receiver's GIL stands between the device and its next batch.

Wire protocol (``multiprocessing.connection``, pickled tuples, authenticated with a shared key):
- server → receiver, once on connect: ``("hello", {...})``: the wire version (``WIRE_VERSION``), pid, device,
  the model keys served, models.
- receiver → server: ``("submit", [(request id, key, payload, items, longest, timeout s, progress), ...])``;
  everything the receiver prepared since its last send, so hand-offs go per batch of requests.
  ``progress``: send this request's progress (a streamed generation).
- receiver → server: ``("cancel", request id)``: stop that request (see ``DeviceLoop.cancel``).
- server → receiver: ``("progress", [(request id, [new token, ...]), ...])`` then ``("done", ([(request id,
  ok, value, rows), ...], arrays))``: what was produced, and every outcome finished, since the last send (a
  request's progress always arrives before its outcome). ``value`` is a Completion for generate, or the
  exception; an encoder's rows travel in ``arrays`` (one numpy array per row shape, every such outcome of the
  send stacked), and ``rows`` says where: ``(array index, first row, end row)``, else None.
- receiver → server ``("stats", request id)``; server → receiver ``("stats", (request id, {...}))``.
Why this channel: measured in benchmarks/handoff.py and written in the README.

The server keeps running while receivers come and go (a receiver that dies is restarted and reconnects);
a receiver whose server is gone exits, leaving its messages unacknowledged for the queue to hand out again.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection, Listener
from types import FrameType
from typing import Any

import torch

from producer.errors import Cancelled
from producer.settings import Kind, Settings
from workers.device import WIRE_VERSION, hang_up
from workers.device.loop import DeviceLoop
from workers.device.passes import load_models, start_loop
from workers.errors import WorkerError
from workers.models.loading import device_label, pick_device, prepare_collector_for_serving

log = logging.getLogger(__name__)
LEAVING_MARGIN_S = 15.0  # after SIGTERM, beside the longest time limit, for receivers to answer and leave


class DeviceServer:
    def __init__(self, settings: Settings, kinds: tuple[Kind, ...], address: str, authkey: bytes) -> None:
        self.settings = settings
        self.kinds = kinds
        self.address = address
        self.authkey = authkey
        self.loop: DeviceLoop | None = None
        self.hello: dict[str, Any] = {}
        self.connections = 0
        self._connected = 0  # receivers connected now
        self._disconnected = threading.Condition()
        self._leaving = False
        self._listener: Listener | None = None

    def stay_for_receivers(self, grace: float) -> None:
        """On SIGTERM, end once the receivers connected are gone (at most ``grace`` seconds), not at once: a
        stop that signals every process of a group together (systemd's default, a container's init, the
        launcher's own death) reaches the receivers in their warm shutdown, and they finish what they run
        on this process first. With no receiver connected, or at a second SIGTERM, it ends at once."""

        def on_term(signum: int, frame: FrameType | None) -> None:
            with self._disconnected:
                if not self._connected or self._leaving:
                    raise SystemExit(0)
                self._leaving = True
                waiting = self._connected
            if self._listener is not None:  # no new receiver meanwhile: it would only hold the process longer
                self._listener.close()
            log.warning("SIGTERM: the device process ends once its %d receiver(s) are gone (at most %.0f s)",
                        waiting, grace)
            threading.Thread(target=self._leave_when_alone, args=(grace,), name="inferq-leaving", daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)

    def _leave_when_alone(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self._disconnected:
            while self._connected and deadline > time.monotonic():
                self._disconnected.wait(deadline - time.monotonic())
            left = self._connected
        if left:
            log.error("%d receiver(s) still connected after %.0f s; the device process ends anyway", left, grace)
        else:
            log.info("its receivers are gone; the device process ends")
        logging.shutdown()
        os._exit(0)

    def load(self) -> None:
        started = time.perf_counter()
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)
        device = pick_device(self.settings.device)
        models = load_models(self.settings, self.kinds, device, weights=True)
        prepare_collector_for_serving()
        self.loop = start_loop(self.settings, models, device)
        self.loop.answering = _Outbox.holding
        label = device_label(device)
        self.hello = {"wire": WIRE_VERSION, "pid": os.getpid(), "device": str(device), "device_label": label,
                      "keys": models.keys(), "models": models.describe(), "load_counts": dict(models.load_counts)}
        log.info("device process ready on %s: %s loaded in %.1f s", label, ", ".join(models.keys()),
                 time.perf_counter() - started)

    def serve(self, until_first_client_leaves: bool = False) -> None:
        """Accept receivers until killed; ``until_first_client_leaves``: the worker-owned child, which ends
        with its one receiver (its parent)."""
        if os.path.exists(self.address):
            if _answers(self.address):  # never take a live device process's socket from it
                raise WorkerError(f"another device process listens at {self.address}; give this one another "
                                  "--listen path")
            os.unlink(self.address)  # a socket left by a device process that was killed
        with Listener(self.address, "AF_UNIX", authkey=self.authkey) as listener:
            self._listener = listener
            log.info("device process %d listens on %s", os.getpid(), self.address)
            while True:
                try:
                    conn = listener.accept()
                except Exception as exc:  # a client with the wrong key, or one gone mid-handshake
                    if self._leaving:  # the listener is closed: the receivers connected are waited for
                        threading.Event().wait()
                    log.warning("refused a connection to the device process: %s", exc)
                    continue
                self.connections += 1
                if until_first_client_leaves:
                    self._serve_connection(conn)
                    return
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                                 name=f"inferq-receiver-{self.connections}").start()

    def _serve_connection(self, conn: Connection) -> None:
        assert self.loop is not None
        with self._disconnected:
            self._connected += 1
        outbox = _Outbox(conn)
        running: dict[int, Future[Any]] = {}  # this receiver's requests not answered yet, for its cancels

        def answered(request_id: int, future: Future[Any]) -> None:
            running.pop(request_id, None)
            outbox.put(request_id, future)

        try:
            conn.send(("hello", self.hello))
            while True:
                tag, body = conn.recv()
                if tag == "submit":
                    for request_id, key, payload, items, longest, timeout, progress, priority in body:
                        try:
                            future = self.loop.submit(key, payload, items, longest, timeout,
                                                      functools.partial(outbox.put_progress, request_id)
                                                      if progress else None, priority)
                        except Exception as exc:  # an unknown key, a stopping loop: that request fails alone
                            future = Future()
                            future.set_exception(exc)
                        running[request_id] = future
                        future.add_done_callback(functools.partial(answered, request_id))
                elif tag == "cancel":
                    cancelled = running.get(body)
                    if cancelled is not None:
                        self.loop.cancel(cancelled)
                elif tag == "stats":
                    outbox.put_stats(body, {"pid": os.getpid(), **self.loop.stats()})
        except (EOFError, OSError):
            pass  # the receiver is gone: its messages come back to the queue for another delivery
        finally:
            # nobody will read what it had in flight: what still waits never runs, a generation stops at
            # its next step, so neither holds the device or its cache beside the messages' next delivery
            for future in list(running.values()):
                self.loop.cancel(future)
            outbox.close()
            conn.close()
            with self._disconnected:
                self._connected -= 1
                self._disconnected.notify_all()


class _Outbox:
    """Outcomes waiting to go back to one receiver, sent together by one thread."""

    _held = threading.local()  # .outboxes: those put to inside ``holding`` on this thread, not woken yet

    @classmethod
    @contextlib.contextmanager
    def holding(cls) -> Iterator[None]:
        """Outcomes put by this thread inside the block wake their outboxes once, at its end: the device
        loop answers a batch at a time, and a wake-up per outcome sent them back a few at a time."""
        held: set[_Outbox] = set()
        cls._held.outboxes = held
        try:
            yield
        finally:
            cls._held.outboxes = None
            for outbox in held:
                with outbox._wake:
                    outbox._wake.notify()

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._done: collections.deque[tuple[int, Future[Any]]] = collections.deque()
        self._progress: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self._stats: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, name="inferq-outbox", daemon=True).start()

    def put(self, request_id: int, future: Future[Any]) -> None:
        held: set[_Outbox] | None = getattr(self._held, "outboxes", None)
        with self._wake:
            self._done.append((request_id, future))
            if held is None:
                self._wake.notify()
        if held is not None:
            held.add(self)

    def put_progress(self, request_id: int, produced: list[Any]) -> None:
        with self._wake:
            self._progress.append((request_id, produced))
            self._wake.notify()

    def put_stats(self, request_id: int, stats: dict[str, Any]) -> None:
        with self._wake:
            self._stats.append((request_id, stats))
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._done and not self._progress and not self._stats and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                done, self._done = list(self._done), collections.deque()
                progress, self._progress = list(self._progress), collections.deque()
                stats, self._stats = list(self._stats), collections.deque()
            try:
                # progress first: all of a request's progress was put before its outcome
                if progress:
                    self._conn.send(("progress", progress))
                if done:
                    self._conn.send(("done", pack_outcomes(done)))
                for item in stats:
                    self._conn.send(("stats", item))
            except Exception as exc:
                # The receiver is gone, or an outcome would not go: close the connection either way, so a
                # live receiver exits and its messages come back, rather than wait forever for these answers.
                # Shut down, not closed here: the connection's serve thread, blocked reading it, wakes and
                # closes it (closed from here, it stayed blocked, and the receiver never saw it go).
                log.error("cannot answer a receiver (%s: %s); closing its connection", type(exc).__name__, exc)
                hang_up(self._conn)
                return


def pack_outcomes(done: list[tuple[int, Future[Any]]]) -> tuple[list[tuple[int, bool, Any, Any]], list[Any]]:
    """The outcomes of one send, with every encoder outcome's rows stacked into one array per row shape:
    pickling an array a request cost 3 us of this process's time a request, one array a send under 1 (34
    single-text embeddings of 384 floats, timed alone). Numpy, not tensors: torch registers shared-memory
    reducers for tensors with this pickler."""
    outcomes: list[tuple[int, bool, Any, Any]] = []
    indices: dict[tuple[Any, ...], int] = {}  # a row shape's array
    stacks: list[list[torch.Tensor]] = []  # the outcomes stacked into each array
    heights: list[int] = []  # the rows each array has so far
    for request_id, future in done:
        ok, value = _outcome(future)
        if ok and isinstance(value, torch.Tensor) and value.dim() >= 1:
            index = indices.setdefault((value.dtype, *value.shape[1:]), len(indices))
            if index == len(stacks):
                stacks.append([])
                heights.append(0)
            start, heights[index] = heights[index], heights[index] + len(value)
            stacks[index].append(value)
            outcomes.append((request_id, True, None, (index, start, heights[index])))
        else:  # a tensor with no rows to stack would be pickled by torch's shared-memory reducer: numpy
            outcomes.append((request_id, ok, value.numpy() if isinstance(value, torch.Tensor) else value, None))
    return outcomes, [torch.cat(rows).numpy() for rows in stacks]


def _outcome(future: Future[Any]) -> tuple[bool, Any]:
    if future.cancelled():  # cancelled by its receiver while it still waited for the device
        return False, Cancelled("the request was cancelled by its caller before it ran")
    exc = future.exception()
    if exc is None:
        return True, future.result()
    try:
        pickle.loads(pickle.dumps(exc))  # both ways: an exception whose __init__ takes other arguments fails here
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return False, exc


def _answers(address: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def run_device_server(settings: Settings, kinds: tuple[Kind, ...], address: str, authkey: bytes,
                      until_first_client_leaves: bool = False) -> None:
    server = DeviceServer(settings, kinds, address, authkey)
    if threading.current_thread() is threading.main_thread():  # where signals can be handled
        server.stay_for_receivers(settings.time_limits.longest + LEAVING_MARGIN_S)
    server.load()
    server.serve(until_first_client_leaves)
