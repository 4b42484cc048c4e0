"""``device_process = true`` on a single worker: the worker starts its own device process as a child.

The same device process the launcher runs for ``--receivers`` (workers/device/server.py), but owned by
one worker: started with ``spawn`` (never fork after torch or CUDA is initialised), listening on a socket
in a private folder, and ending when its one receiver (this worker) disconnects or dies. If it dies, the
worker exits with code 70 at once (workers/device/remote.py), so its unacknowledged messages go back to
the queue and its supervisor restarts it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

from producer.settings import Kind, Settings
from workers import logs
from workers.device.server import run_device_server

log = logging.getLogger(__name__)


class DeviceProcess:
    def __init__(self, settings: Settings, kinds: tuple[Kind, ...], node: str) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="inferq-device-"))
        self.address = str(self._folder / "device.sock")
        self.authkey = secrets.token_bytes(32)
        context = mp.get_context("spawn")
        self._process = context.Process(target=_child, name="inferq-device-process", daemon=True,
                                        args=(settings, kinds, self.address, self.authkey, node))
        self._process.start()
        log.info("started the device process (pid %s)", self._process.pid)

    def exitcode(self) -> int | None:
        return self._process.exitcode

    def close(self) -> None:
        self._process.join(timeout=10)  # it ends once our connection is shut down
        if self._process.is_alive():
            self._process.kill()
        shutil.rmtree(self._folder, ignore_errors=True)


def _child(settings: Settings, kinds: tuple[Kind, ...], address: str, authkey: bytes, node: str) -> None:
    logs.configure(settings.log_level, f"{node} device")
    threading.Thread(target=_exit_with_parent, args=(str(Path(address).parent),), daemon=True).start()
    run_device_server(settings, kinds, address, authkey, until_first_client_leaves=True)


def _exit_with_parent(folder: str) -> None:
    """A worker killed before it connected (while this loads, say) would leave this process holding the
    weights, GPU memory included, with nobody to serve: end with it, and take the socket folder along."""
    parent = mp.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)
