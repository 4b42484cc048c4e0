"""The stall watch: a device that stops making progress ends its process, for its supervisor to restart."""

from __future__ import annotations

import logging
import time

from workers.device.loop import DeviceLoop
from workers.exits import hard_exit

log = logging.getLogger(__name__)

EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: the supervisor restarts the process


def exit_on_stall(loop: DeviceLoop, limit: float) -> None:
    """Watch a device loop from a thread of its own; end the process if the device stops making progress."""
    while True:
        time.sleep(min(5.0, limit / 4))
        busy_since = loop.busy_since
        if busy_since is not None and time.monotonic() - busy_since > limit:
            # A device that makes no progress cannot be recovered from inside: exit without acknowledging,
            # so the broker hands this worker's messages to another, and the supervisor restarts us.
            log.critical("the device made no progress for %.0f s (limit %g s); exiting",
                         time.monotonic() - busy_since, limit)
            hard_exit(EXIT_DEVICE_FAILED)
        if loop.died:
            why = "the device failed" if loop.broken is not None else "the device loop thread died"
            log.critical("%s; exiting so the supervisor restarts this worker", why)
            hard_exit(EXIT_DEVICE_FAILED)
