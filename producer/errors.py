"""The error types every inferq task can fail with.

They live in the producer package, which imports neither torch nor transformers, so a web app that only
enqueues can still catch them. The worker raises them; Celery stores them in the result backend as
``{"exc_type": "InvalidInput", "exc_module": "producer.errors", "exc_message": "..."}``, and the Python
producer gets the same class back from ``AsyncResult.get()``. ``exc_message`` is always one readable
string: what was wrong, where, and what is allowed.
"""

from __future__ import annotations


class InferqError(Exception):
    """Base class of every error inferq stores for a task."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(InferqError):
    """A kwarg has the wrong type, is empty, out of range, unknown, or conflicts with another."""


class UnknownModel(InferqError):
    """The ``model`` kwarg names no entry of the worker's model registry for that kind."""


class InputTooLarge(InferqError):
    """The request is over a limit: characters per text, texts per request, or tokens."""


class TaskTimeout(InferqError):
    """The task waited or ran past its kind's time limit."""


class OutOfMemory(InferqError):
    """The input cannot fit in device memory even on its own."""


class Cancelled(InferqError):
    """The caller cancelled the task (``Client.cancel``) before it finished; the device stopped working on it."""


class InvalidMessage(InferqError):
    """The task message itself could not be decoded."""


class PoisonMessage(InferqError):
    """The message was delivered too many times, each time without an answer (its worker died): it is not run
    again, and is kept in the dead-letter list for inspection."""


class InferqConnectionError(InferqError):
    """The broker or the result backend could not be reached within the configured timeouts."""


class ResultTimeout(InferqError):
    """No result arrived within the time the caller was willing to wait.

    The task may still run and its result be stored later; the handle stays valid.
    """


class StreamRestarted(InferqError):
    """A streamed generation's worker died and the next delivery decoded a different text: what was read of
    the stream is void (raised by the Python client; the stream itself holds a ``restart`` entry)."""


# Names a foreign client may see in ``exc_type``; used to rebuild the right class from a stored failure.
TASK_ERRORS: dict[str, type[InferqError]] = {
    cls.__name__: cls
    for cls in (InvalidInput, UnknownModel, InputTooLarge, TaskTimeout, OutOfMemory, Cancelled, InvalidMessage,
                PoisonMessage)
}
