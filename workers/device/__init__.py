"""The device side: the pure batching core, the one loop that owns the device, the optional device process
that runs encoder passes out of reach of the receiving side's GIL, and the runtime that loads the models and
takes a request from validation to its result."""

from __future__ import annotations

import contextlib
import os
import socket
from multiprocessing.connection import Connection

# The wire protocol between receivers and a device process (workers/device/server.py). A device process
# announces it in its hello; a receiver of another version refuses to start rather than misread replies.
# 2: a reply's encoder rows travel stacked, one array per row shape.
# 3: a prepared generate request carries the new tokens its row may generate (fit_new_tokens).
WIRE_VERSION = 3


def hang_up(conn: Connection) -> None:
    """Shut a receiver's or a device process's connection down both ways. Closing it alone does not wake a
    thread blocked reading it (on Linux the socket lives on until that read returns), so the other end never
    saw it go; shut down, the reader gets end-of-file and closes it in its own time."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)
