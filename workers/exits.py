"""Leaving a process at once, where a clean exit could hang on what failed (a device that stopped, a device
process gone): ``os._exit``, which skips ``atexit``, after the last words registered here. Those are what
must not be lost with the process, such as the messages only its memory holds (receiving/stranded.py)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

_last_words: list[Callable[[], None]] = []


def before_hard_exit(say: Callable[[], None]) -> None:
    """Run ``say`` before ``hard_exit`` ends the process (it must not block: the process is failing)."""
    _last_words.append(say)


def hard_exit(code: int) -> None:
    for say in _last_words:
        with contextlib.suppress(Exception):
            say()
    for handler in logging.getLogger().handlers:  # the last lines reach the log before the process ends
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)
