"""The public contract: task names, queues, request shapes and their validation.

Both sides call :func:`validate`: the producer before it enqueues, the worker again when a message
arrives (foreign clients skip the producer). Everything here is plain Python and pydantic, so a web app
can import it without torch.
"""

from __future__ import annotations

import math
import time
import unicodedata
from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator
from pydantic_core import ErrorDetails

from producer.errors import InputTooLarge, InvalidInput
from producer.settings import KINDS, Kind, Limits

TASK_PREFIX = "inferq."
MAX_SEED = 2**63 - 1
MAX_STOP_CHARS = 100
MAX_MODEL_NAME_CHARS = 100


def task_name(kind: Kind) -> str:
    return TASK_PREFIX + kind


def queue_name(kind: Kind) -> str:
    """Each kind has its own queue, named like the kind."""
    return kind


# Two lanes, as the message's priority property: Kombu's Redis transport keeps a queue's messages of each
# priority step (0, 3, 6, 9) in lists of their own and a worker takes from step 0's first, so bulk work waits
# behind interactive work in Redis; the device takes lower priorities first among what a worker holds.
# A message without a priority (every ordinary Celery client's) is interactive.
Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")
LANE_PRIORITY: dict[Lane, int] = {"interactive": 0, "bulk": 9}
PRIORITY_STEPS = (0, 3, 6, 9)  # Kombu's default steps, which both sides use
PRIORITY_SEP = "\x06\x16"  # Kombu's separator between a queue's name and its step


# Our producers stamp each message with the Unix time it was sent, so the age of the oldest waiting message
# is known (monitoring.QueueDepthCollector); a protocol-2 message carries no send time of its own.
SENT_HEADER = "inferq_sent"


def sent_now() -> dict[str, float]:
    """The headers our producers add to a message."""
    return {SENT_HEADER: time.time()}


def queue_keys(queue: str) -> list[str]:
    """The Redis lists of a queue, one per priority step, in the order a worker takes from them."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def message_priority(value: Any) -> int:
    """A message's priority property as the device orders it: 0 (first) to 9, anything unreadable 0,
    as Kombu files it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(0, min(9, int(value)))


STREAM_PREFIX = "inferq:stream:"
CANCEL_PREFIX = "inferq:cancel:"
CANCEL_CHANNEL = "inferq:cancel"


def stream_key(task_id: str) -> str:
    """The Redis Stream (on the result backend's Redis) a ``stream: true`` generate task publishes its text to."""
    return STREAM_PREFIX + task_id


def cancel_key(task_id: str) -> str:
    """Set (with a TTL) to cancel a generate task: a worker that takes it later refuses to run it."""
    return CANCEL_PREFIX + task_id


# --- requests -------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: JSON has no coercion ("1" is not 1, true is not 1); frozen: requests are values.
    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=()
    )


class _Request(_Strict):
    model: str | None = None

    @model_validator(mode="after")
    def _check_model_name(self) -> _Request:
        if self.model is not None and not 0 < len(self.model) <= MAX_MODEL_NAME_CHARS:
            raise InvalidInput(
                f"model must be the alias of a configured model (1 to {MAX_MODEL_NAME_CHARS} characters), "
                "or omitted for the default"
            )
        return self


class EmbedRequest(_Request):
    texts: list[str]
    normalize: bool = True

    @model_validator(mode="after")
    def _check_limits(self, info: ValidationInfo) -> EmbedRequest:
        _check_texts(self.texts, _limits(info))
        return self


class ClassifyRequest(_Request):
    texts: list[str]
    labels: list[str] | None = None
    top_k: int = 1

    @model_validator(mode="after")
    def _check_limits(self, info: ValidationInfo) -> ClassifyRequest:
        limits = _limits(info)
        _check_texts(self.texts, limits)
        if self.top_k < 1:
            raise InvalidInput(f"top_k must be an integer >= 1; got {self.top_k}")
        if self.labels is not None:
            _check_labels(self.labels, limits)
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(_Request):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_new_tokens: int = 64
    # true: a prompt that leaves the model less room than max_new_tokens generates what room there is (ending
    # with finish_reason "length"), as OpenAI's chat does without max_tokens, instead of being refused
    fit_new_tokens: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool = False  # publish the text as it is decoded to the task's Redis Stream (stream_key)

    @model_validator(mode="after")
    def _check_limits(self, info: ValidationInfo) -> GenerateRequest:
        limits = _limits(info)
        if (self.prompt is None) == (self.messages is None):
            raise InvalidInput("generate takes exactly one of prompt (a string) or messages (a chat list); "
                               f"got {'both' if self.prompt is not None else 'neither'}")
        if self.prompt is not None:
            _check_text("prompt", self.prompt, limits)
        if self.messages is not None:
            if not self.messages:
                raise InvalidInput("messages must be a non-empty list of {role, content} objects; got []")
            _check_count("messages", self.messages, limits)
            for i, message in enumerate(self.messages):
                _check_text(f"messages[{i}].content", message.content, limits)
        if not self.max_new_tokens >= 1:
            raise InvalidInput(f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens}")
        if self.max_new_tokens > limits.max_new_tokens:
            raise InputTooLarge(f"max_new_tokens is {self.max_new_tokens}; at most {limits.max_new_tokens} "
                                "is allowed")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidInput(f"temperature must be between 0 (greedy) and 2; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidInput(f"seed must be an integer from 0 to 2**63-1; got {self.seed}")
        if self.stop is not None:
            _check_count("stop", self.stop, limits)
            for i, stop in enumerate(self.stop):
                _check_unicode(f"stop[{i}]", stop)
                if not 0 < len(stop) <= MAX_STOP_CHARS:
                    raise InvalidInput(f"stop[{i}] must be a string of 1 to {MAX_STOP_CHARS} characters; "
                                       f"got {len(stop)} characters")
        return self


Request = EmbedRequest | ClassifyRequest | GenerateRequest
REQUEST_TYPES: dict[Kind, type[EmbedRequest] | type[ClassifyRequest] | type[GenerateRequest]] = {
    "embed": EmbedRequest,
    "classify": ClassifyRequest,
    "generate": GenerateRequest,
}

# What each argument accepts, appended to type errors so the message says what is allowed.
ALLOWED: dict[str, str] = {
    "texts": "texts must be a non-empty list of strings",
    "labels": "labels must be a non-empty list of distinct strings, or omitted",
    "top_k": "top_k must be an integer >= 1",
    "normalize": "normalize must be true or false",
    "model": "model must be a model alias (a string), or omitted",
    "prompt": "prompt must be a string",
    "messages": "messages must be a non-empty list of {\"role\": system|user|assistant, \"content\": string}",
    "max_new_tokens": "max_new_tokens must be an integer >= 1",
    "fit_new_tokens": "fit_new_tokens must be true or false",
    "temperature": "temperature must be a number from 0 to 2",
    "top_p": "top_p must be a number in (0, 1]",
    "stop": "stop must be a list of strings, or omitted",
    "seed": "seed must be an integer from 0 to 2**63-1, or omitted",
    "stream": "stream must be true or false",
}


# --- results (what the worker stores; documented in the README) -----------------------------------------


class EmbedResult(TypedDict):
    model: str
    dim: int
    embeddings: list[list[float]]
    # tokens of all the texts, special tokens included (what the model ran)
    prompt_tokens: NotRequired[int]
    # the same, per text in order: a coalesced call's prompt_tokens is the sum over its own texts (workers
    # older than this field send none, and a coalesced call then has no prompt_tokens)
    text_tokens: NotRequired[list[int]]


class LabelScore(TypedDict):
    label: str
    score: float


class ClassifyResult(TypedDict):
    model: str
    results: list[list[LabelScore]]


class GenerateResult(TypedDict):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


# --- validation ---------------------------------------------------------------------------------------


def validate(kind: Kind, kwargs: Any, limits: Limits, args: Any = ()) -> Request:
    """Check one task's arguments; raise :class:`InvalidInput` or :class:`InputTooLarge` naming the problem."""
    if kind not in KINDS:
        raise InvalidInput(f"unknown task kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if args:
        raise InvalidInput(f"inferq.{kind} takes keyword arguments only; got {len(args)} positional "
                           f"argument(s). Pass them as kwargs: {_allowed_names(kind)}")
    if not isinstance(kwargs, dict):
        raise InvalidInput(f"inferq.{kind} kwargs must be an object; got {json_type_name(kwargs)}")
    unknown = sorted(str(key) for key in kwargs if key not in REQUEST_TYPES[kind].model_fields)
    if unknown:
        raise InvalidInput(f"unknown argument(s) {few_names(unknown)} for inferq.{kind}; allowed: "
                           f"{_allowed_names(kind)}")
    # null means the argument's default, for every argument alike (as the Python client leaves None out, and
    # as OpenAI reads null); it was refused for some (top_k, normalize) and taken for others (seed, model)
    given = {key: value for key, value in kwargs.items() if value is not None}
    # A list over its limit is refused before its items are checked one by one: two million wrong items took
    # seconds and gigabytes of error reports first.
    for name in _LIST_LIMITS:
        value = given.get(name)
        if isinstance(value, list):
            _check_count(name, value, limits)
    try:
        return REQUEST_TYPES[kind].model_validate(given, context=limits)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc.errors())) from None


# The list arguments with a count limit: the Limits field, and how the refusal names their items.
_LIST_LIMITS = {"texts": ("max_texts", "items", " per request"), "labels": ("max_labels", "items", ""),
                "messages": ("max_messages", "items", ""), "stop": ("max_stop", "strings", "")}


def _check_count(name: str, values: list[Any], limits: Limits) -> None:
    field, unit, tail = _LIST_LIMITS[name]
    cap = getattr(limits, field)
    if len(values) > cap:
        raise InputTooLarge(f"{name} has {len(values)} {unit}; at most {cap} are allowed{tail}")


def _allowed_names(kind: Kind) -> str:
    return ", ".join(REQUEST_TYPES[kind].model_fields)


def _limits(info: ValidationInfo) -> Limits:
    limits = info.context
    if not isinstance(limits, Limits):  # validate() always passes them; direct construction gets defaults
        return Limits()
    return limits


def _check_unicode(where: str, text: str) -> None:
    # JSON can carry lone UTF-16 surrogates ("\ud800"); they are not characters, and no tokenizer takes them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at position "
                           f"{exc.start}; send UTF-8 text") from None


def _check_text(where: str, text: str, limits: Limits) -> None:
    _check_unicode(where, text)
    if not text:
        raise InvalidInput(f"{where} is an empty string; it must have 1 to {limits.max_chars} characters")
    if len(text) > limits.max_chars:
        raise InputTooLarge(f"{where} has {len(text)} characters; at most {limits.max_chars} are allowed")


def _visible(text: str) -> bool:
    """Whether the text has a character that shows: not only spaces, nor format or control characters alone
    (a zero-width space, a byte-order mark, NUL), which embed as nothing. By category, not isprintable(): a
    character newer than this Python's Unicode data (an emoji, say) is unassigned to it, not invisible."""
    return any(not char.isspace() and unicodedata.category(char) not in _INVISIBLE for char in text)


_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})  # control, format and separator characters


def _check_texts(texts: list[str], limits: Limits) -> None:
    if not texts:
        raise InvalidInput("texts must be a non-empty list of strings; got []")
    _check_count("texts", texts, limits)
    for i, text in enumerate(texts):
        _check_text(f"texts[{i}]", text, limits)
        if not _visible(text):  # as for labels: nothing to embed or classify but padding
            raise InvalidInput(f"texts[{i}] has only whitespace or invisible characters; each text must have "
                               "visible characters")


def _check_labels(labels: list[str], limits: Limits) -> None:
    if not labels:
        raise InvalidInput("labels must be a non-empty list of distinct strings, or omitted; got []")
    _check_count("labels", labels, limits)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        _check_unicode(f"labels[{i}]", label)
        if not _visible(label):
            raise InvalidInput(f"labels[{i}] has no visible characters; each label must have some")
        if len(label) > limits.max_label_chars:
            raise InputTooLarge(f"labels[{i}] has {len(label)} characters; at most {limits.max_label_chars} "
                                "are allowed")
        # "x" and "x " tokenise alike: their scores would split one label's evenly
        first = seen.setdefault(label.strip(), i)
        if first != i:
            raise InvalidInput(f"labels[{i}] repeats labels[{first}] ({label.strip()!r}, spaces aside); labels must "
                               "be distinct")


_PHRASES = {
    "string_type": "must be a string",
    "list_type": "must be a list",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
}


def _describe(errors: list[ErrorDetails]) -> str:
    """One readable sentence per pydantic error: where, what was wrong, what is allowed."""
    parts: list[str] = []
    for error in errors[:5]:
        where = _location(error["loc"])
        phrase = _PHRASES.get(error["type"]) or "must be " + error["msg"].removeprefix("Input should be ")
        got = "" if error["type"] in ("missing", "extra_forbidden") else f"; got {_value_summary(error)}"
        allowed = ALLOWED.get(str(error["loc"][0])) if error["loc"] else None
        if allowed and len(error["loc"]) == 1 and error["type"] != "missing":
            parts.append(allowed + got)  # the argument itself is wrong: say what it must be
        else:
            parts.append(f"{where} {phrase}{got}" + (f" ({allowed})" if allowed else ""))
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more problem(s)")
    return "; ".join(parts)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        # pydantic adds the union branch name ("list[str]", "str") to loc for optional fields; skip it
        if isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"}):
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "kwargs"


def _value_summary(error: ErrorDetails) -> str:
    value = error.get("input")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) <= 40:
        return f"string {value!r}"
    return json_type_name(value)


def few_names(names: list[str], most: int = 5, longest: int = 40) -> str:
    """Names a caller sent, for an error message: a few, each cut short. The error is stored and logged,
    whatever was sent (a 100 kB argument name, thousands of them)."""
    shown = ", ".join(repr(name) if len(name) <= longest else repr(name[:longest] + "...") for name in names[:most])
    return shown + (f" (and {len(names) - most} more)" if len(names) > most else "")


def json_type_name(value: Any) -> str:
    """What a decoded JSON value is (null, string, object, list, int, ...), for error messages."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list",
             dict: "object", tuple: "list"}
    return names.get(type(value), type(value).__name__)
