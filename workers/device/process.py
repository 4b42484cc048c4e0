"""Encoder forward passes in a process of their own, so the device never waits for the worker's GIL.

In the worker process the device thread needs the GIL between every torch operation, and Celery's
consumer and task threads hold it most of the time under load: a batch of 30 texts took 350 ms inside
the worker against about 150 ms for the same model alone on this CPU (``device ms/batch`` in
``inferq bench``). With ``device_process = true`` the worker keeps receiving, batching, tokenising and
answering, and sends each encoder batch (token ids) over a pipe to a child process that owns the
encoder models; the device thread waits on the pipe with the GIL released. Generation stays in the
worker process for now.

The child is started with ``spawn`` (never fork after torch or CUDA is initialised) and exits when its
pipe closes, which includes the worker dying. If the child dies, the worker exits with code 70 at once, so
its unacknowledged messages go back to the queue and the launcher restarts it. Each pipe message is
(model key, token ids, inputs per pass, padded tokens per pass); the answer ("ok", float32 rows) or
("error", exception).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from multiprocessing.connection import Connection
from typing import Any

import torch

from producer.settings import ModelEntry

log = logging.getLogger(__name__)

EXIT_DEVICE_PROCESS_DIED = 70  # EX_SOFTWARE


class DeviceProcessDied(RuntimeError):
    pass


class DeviceProcess:
    """The parent's side: one child process and one pipe; calls are serialised (one device thread)."""

    def __init__(self, encoders: dict[str, tuple[str, str, ModelEntry]], device: str,
                 torch_threads: int | None) -> None:
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(target=_serve, args=(child_conn, encoders, device, torch_threads),
                                        name="inferq-device-process", daemon=True)
        self._process.start()
        child_conn.close()
        ready = self._receive()
        log.info("device process %d serves %s on %s", self._process.pid, ", ".join(ready), device)

    def run(self, key: str, ids: list[list[int]], max_items: int, max_tokens: int) -> torch.Tensor:
        with self._lock:
            try:
                self._conn.send((key, ids, max_items, max_tokens))
                rows = self._receive()
            except (DeviceProcessDied, OSError) as exc:
                # No encoder batch can run any more. Failing each request would answer (and acknowledge) every
                # message still to come with an error; ending the worker sends them back to the queue for a
                # live worker, and the launcher starts this one again.
                log.critical("the device process is gone (%s); the worker exits so its messages are redelivered",
                             exc)
                os._exit(EXIT_DEVICE_PROCESS_DIED)
        return torch.from_numpy(rows)

    def _receive(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise DeviceProcessDied(f"the device process (pid {self._process.pid}) exited with "
                                    f"{self._process.exitcode}") from exc
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        self._conn.close()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


def _serve(conn: Connection, encoders: dict[str, tuple[str, str, ModelEntry]], device: str,
           torch_threads: int | None) -> None:
    from workers.models.classify import SequenceClassifier
    from workers.models.embed import PooledEmbedder

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    target = torch.device(device)
    runners: dict[str, Any] = {}
    try:
        for key, (kind, alias, entry) in encoders.items():
            if kind == "embed":
                runners[key] = PooledEmbedder.load(alias, entry, target).vectors
            else:
                runners[key] = SequenceClassifier.load(alias, entry, target).probabilities
    except Exception as exc:
        conn.send(("error", exc))
        return
    conn.send(("ok", sorted(runners)))
    while True:
        try:
            key, ids, max_items, max_tokens = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe or died
        try:
            with torch.inference_mode():
                rows = runners[key](ids, max_items, max_tokens)
            conn.send(("ok", rows.float().cpu().numpy()))
        except Exception as exc:  # CUDA OOM included: the worker's device loop splits the batch and retries
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # give the halves the memory the failed pass held in the cache
            conn.send(("error", exc))
