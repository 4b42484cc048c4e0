"""inferq's producer side: enqueue embed, classify and generate tasks and get their results.

Importing this package never imports torch or transformers.
"""

from producer.client import Client, Handle
from producer.errors import (
    Cancelled,
    InferqConnectionError,
    InferqError,
    InputTooLarge,
    InvalidInput,
    InvalidMessage,
    OutOfMemory,
    PoisonMessage,
    ResultTimeout,
    StreamRestarted,
    TaskTimeout,
    UnknownModel,
)
from producer.settings import Settings

__all__ = [
    "Cancelled",
    "Client",
    "Handle",
    "InferqConnectionError",
    "InferqError",
    "InputTooLarge",
    "InvalidInput",
    "InvalidMessage",
    "OutOfMemory",
    "PoisonMessage",
    "ResultTimeout",
    "Settings",
    "StreamRestarted",
    "TaskTimeout",
    "UnknownModel",
]
