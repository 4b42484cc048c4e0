"""What Celery's tracer logs about two outcomes that inferq reports itself, in one line each.

- A result the backend refused to store (``ResultNotStored``): Celery logged it twice, each with a traceback
  of some 50 lines (a RuntimeWarning "Exception raised outside body", then an ERROR "raised unexpected"),
  before ``InferqRequest`` logs its own line saying what happens to the message. During a failover that is
  every message a worker finishes: the log's flood hid the one line that matters. Celery's two are dropped.
- A redelivered message that goes back to its queue because the quarantine stayed busy
  (``QuarantineFull``): expected whenever two redelivered messages meet in one worker, and counted
  (``quarantine_full``); Celery logged each at WARNING with a traceback. It is logged at INFO, without one.
"""

from __future__ import annotations

import logging
import warnings

from workers.errors import QuarantineFull, ResultNotStored

TRACE_LOGGER = "celery.app.trace"


class TraceNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ResultNotStored):
            return False
        if isinstance(exc, QuarantineFull):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info, record.exc_text = None, None
            # the logger weighed the record's level before its filters: weigh the new one (--loglevel WARNING)
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def install() -> None:
    """Once per process; a second call changes nothing."""
    logger = logging.getLogger(TRACE_LOGGER)
    if not any(isinstance(existing, TraceNoise) for existing in logger.filters):
        logger.addFilter(TraceNoise())
    warnings.filterwarnings("ignore", message=f"Exception raised outside body: {ResultNotStored.__name__}\\(",
                            category=RuntimeWarning)
