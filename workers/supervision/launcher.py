"""Supervise the worker processes of this machine: start them, restart the ones that die, stop them all
on SIGTERM or Ctrl-C.

Per GPU one device process that holds the models and N receivers (Celery workers that take, tokenise and
answer messages) that send it their model work over a Unix socket; on the CPU the same with --receivers,
or whole workers (each with its models) without. A device process that dies takes its receivers with it
(SIGKILL: whatever they held stays unacknowledged and is handed out again), and all of them start again.

The launcher never imports torch: it counts GPUs with ``nvidia-smi``, and each child is a fresh process
(exec, not a fork of this one) that sees only its own GPU through ``CUDA_VISIBLE_DEVICES`` (receivers see
none). So CUDA is initialised only inside the children, once each, and nothing forks after it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from producer.settings import Kind
from workers.supervision.metrics_server import process_ended

log = logging.getLogger("inferq.launcher")

# A child that ran this long before dying is restarted at once; one that dies sooner waits, doubling up
# to the cap, so a worker that cannot start (a bad config, a broken GPU) does not spin.
STABLE_AFTER_S = 60.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


class LaunchError(Exception):
    """The --gpus / --replicas request cannot be met on this machine."""


@dataclass(frozen=True)
class Slot:
    """One process to keep running: a worker (its Celery node name) or a device process, and its device."""

    name: str
    visible_devices: str  # CUDA_VISIBLE_DEVICES for the child; "" hides every GPU
    device: str  # the child's INFERQ_DEVICE
    listen: str | None = None  # a device process: the socket it listens on
    device_server: str | None = None  # a receiver: its device process's socket

    @property
    def is_device_process(self) -> bool:
        return self.listen is not None


MAX_DEFAULT_RECEIVERS = 8


def default_receivers(cores: int, devices: int) -> int:
    """Receivers per GPU when --receivers is not given: a core each, one core left to the device process."""
    return min(MAX_DEFAULT_RECEIVERS, max(1, cores // max(1, devices) - 1))


def split_slots(slots: list[Slot], receivers: int, folder: str) -> list[Slot]:
    """Each worker slot as one device process and ``receivers`` receivers of it.

    With one receiver it keeps the worker's node name (gpu0@host); with more they are gpu0-r1@host, ...
    """
    if receivers < 1:
        raise LaunchError(f"--receivers must be at least 1; got {receivers}")
    split: list[Slot] = []
    for slot in slots:
        base, _, host = slot.name.partition("@")
        socket_path = f"{folder}/{base}.sock"
        split.append(Slot(f"{base}-device", slot.visible_devices, slot.device, listen=socket_path))
        names = [slot.name] if receivers == 1 else [f"{base}-r{i}@{host}" for i in range(1, receivers + 1)]
        # receivers never touch the device: they see no GPU at all
        split.extend(Slot(name, "", slot.device, device_server=socket_path) for name in names)
    return split


def plan_slots(gpus: str, replicas: int | None, host: str, available: Callable[[], list[str]]) -> list[Slot]:
    """``--gpus all|none|0,2`` and ``--replicas N`` (None: not given) as the worker processes to run.

    GPU ids are what ``nvidia-smi`` (or this process's CUDA_VISIBLE_DEVICES) calls them; the child sees its
    GPU as cuda:0.
    """
    if replicas is not None and replicas < 1:
        raise LaunchError(f"--replicas must be at least 1; got {replicas}")
    spec = gpus.strip().lower()
    if spec == "none":
        return [Slot(f"cpu{i}@{host}", "", "cpu") for i in range(replicas or 1)]
    if replicas is not None:  # even --replicas 1: asked for on GPUs, it would be silently ignored
        # Two processes on one GPU would each hold a copy of the models and contend for the same device.
        raise LaunchError("--replicas is for --gpus none: each GPU gets exactly one worker, which batches for it")
    present = available()
    if spec == "all":
        if not present:
            raise LaunchError("--gpus all: no GPU found (nvidia-smi lists none, or is missing); use --gpus none")
        chosen = present
    else:
        chosen = [part.strip() for part in spec.split(",") if part.strip()]
        if not chosen:
            raise LaunchError(f"--gpus must be all, none or GPU ids like 0,2; got {gpus!r}")
        unknown = [gpu for gpu in chosen if gpu not in present]
        if unknown:
            raise LaunchError(f"--gpus names {', '.join(unknown)}, but this machine has "
                              f"{', '.join(present) if present else 'no GPU'}")
        if len(set(chosen)) != len(chosen):
            raise LaunchError(f"--gpus names a GPU twice: {gpus!r}")
    return [Slot(f"gpu{gpu}@{host}", gpu, "cuda:0") for gpu in chosen]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists."""
    restricted = os.environ.get("CUDA_VISIBLE_DEVICES")
    if restricted is not None:
        return [part.strip() for part in restricted.split(",") if part.strip() and part.strip() != "-1"]
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


LAUNCHER_PID = "INFERQ_LAUNCHER_PID"  # set in a child's environment: the launcher that supervises it


def die_with_launcher() -> None:
    """In a child of the launcher, first thing: get SIGTERM if the launcher dies, so no worker outlives it
    unsupervised; and end now if it died already (between the start and this call). Set here, after the
    exec, rather than in a preexec_fn: code run between fork and exec in a process with threads (the
    launcher's metrics server) can deadlock on a lock another thread held at the fork."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return
    # Not Linux (no prctl): the children simply outlive a killed launcher.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != launcher:
        raise SystemExit(f"the launcher (pid {launcher}) that started this process is gone")


@dataclass
class Child:
    slot: Slot
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    taken_down: bool = False  # killed because its device process died: restart at once, no backoff


class Launcher:
    """Keeps one process running per slot until told to stop."""

    def __init__(self, slots: Sequence[Slot], kinds: tuple[Kind, ...], concurrency: int | None,
                 shutdown_grace: float, torch_threads: int | None = None, device_key: str | None = None) -> None:
        self.children = [Child(slot) for slot in slots]
        self.kinds = kinds
        self.concurrency = concurrency
        self.shutdown_grace = shutdown_grace
        self.torch_threads = torch_threads
        # shared by the device processes and their receivers only (the socket is also only theirs to open)
        self.device_key = device_key or secrets.token_hex(32)
        self._stop = threading.Event()
        self._signals = 0

    # --- one child ------------------------------------------------------------------------------------

    def command(self, slot: Slot) -> list[str]:
        kinds = ",".join(self.kinds)
        if slot.listen is not None:
            return [sys.executable, "-m", "producer.cli", "device-server", "--listen", slot.listen, "--kinds", kinds,
                    "--name", slot.name]
        argv = [sys.executable, "-m", "producer.cli", "worker", "--name", slot.name, "--kinds", kinds]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        return argv

    def environment(self, slot: Slot) -> dict[str, str]:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot.visible_devices, INFERQ_DEVICE=slot.device)
        env[LAUNCHER_PID] = str(os.getpid())  # see die_with_launcher
        if slot.device_server is not None:
            # A receiver runs no model: torch's thread pools (and OpenMP's spinning threads, measured at
            # 540-618 us of CPU per message) would only take cores from the device process and the others.
            env.update(INFERQ_DEVICE_SERVER=slot.device_server, INFERQ_DEVICE_SERVER_KEY=self.device_key,
                       INFERQ_TORCH_THREADS="1", OMP_NUM_THREADS="1")
            return env
        if slot.listen is not None:
            env["INFERQ_DEVICE_SERVER_KEY"] = self.device_key
        if slot.device == "cpu" and "INFERQ_TORCH_THREADS" not in os.environ and self.torch_threads:
            # N CPU workers each using every core would fight over them; share the cores out instead.
            env["INFERQ_TORCH_THREADS"] = str(self.torch_threads)
        return env

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(self.command(child.slot), env=self.environment(child.slot),
                                         # its own session: a terminal's Ctrl-C reaches only the launcher,
                                         # which then stops each child exactly once
                                         start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d, CUDA_VISIBLE_DEVICES=%r)", child.slot.name, child.process.pid,
                 child.slot.visible_devices)

    def _check(self, child: Child, now: float) -> None:
        if child.process is None:
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                log.warning("restarting %s (restart %d)", child.slot.name, child.restarts)
                self._start(child)
            return
        code = child.process.poll()
        if code is None:
            return
        ran = now - child.started_at
        if child.taken_down:
            delay, child.taken_down = 0.0, False
        elif ran >= STABLE_AFTER_S:
            delay, child.backoff = 0.0, BACKOFF_FIRST_S
        else:
            delay, child.backoff = child.backoff, min(child.backoff * 2, BACKOFF_MAX_S)
        log.error("%s (pid %d) exited with %s after %.1f s; restarting in %.0f s", child.slot.name,
                  child.process.pid, _describe_exit(code), ran, delay)
        process_ended(child.process.pid)
        child.process = None
        child.restart_at = now + delay
        if child.slot.listen is not None:
            self._take_down_receivers(child.slot.listen)

    def _take_down_receivers(self, socket_path: str) -> None:
        """A device process died: its receivers cannot run anything. SIGKILL, not a warm shutdown, so that
        nothing they held is acknowledged; the queue hands it out again after the visibility timeout."""
        for receiver in self.children:
            if receiver.slot.device_server != socket_path or receiver.process is None:
                continue
            receiver.taken_down = True  # most exit by themselves (code 70) the moment the socket closes
            if receiver.process.poll() is None:
                log.warning("killing %s (pid %d): its device process is gone", receiver.slot.name,
                            receiver.process.pid)
                receiver.process.kill()

    # --- the whole set --------------------------------------------------------------------------------

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            while not self._stop.wait(0.5):
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
            return self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("%s: warm shutdown of %d processes (running tasks finish; unstarted ones go back to the "
                        "queue); signal again to stop at once", signal.Signals(signum).name, len(self.children))
            self._stop.set()
        else:
            log.warning("second signal: cold shutdown")
            self._send(signal.SIGQUIT)

    def _send(self, sig: int, children: Sequence[Child] | None = None) -> None:
        for child in self.children if children is None else children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(sig)

    def _shutdown(self) -> int:
        # Workers first (Celery's warm shutdown: what they run finishes, on their device processes), then
        # the device processes, once nothing needs them.
        workers = [child for child in self.children if not child.slot.is_device_process]
        devices = [child for child in self.children if child.slot.is_device_process]
        for group in (workers, devices):
            self._send(signal.SIGTERM, group)
            deadline = time.monotonic() + self.shutdown_grace
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    # Late acknowledgement: whatever it still held is redelivered after the visibility timeout.
                    log.error("%s did not stop within %.0f s; killing it", child.slot.name, self.shutdown_grace)
                    child.process.kill()
                    child.process.wait()
        log.info("all workers stopped")
        return 0


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
