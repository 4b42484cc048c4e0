"""OpenAI request bodies to inferq task kwargs, and inferq results to OpenAI responses.

Only what inferq can honour is accepted: a field it cannot keep (``n`` > 1, token-id inputs, ``dimensions``,
tools, log probabilities) is refused with InvalidInput naming it. A field given as null means its default,
as OpenAI reads it; the no-op values of refused fields (``tool_choice: "none"``, ``response_format`` of
type text) pass, and the OpenAI fields that change nothing about the answer (``user``, ``metadata``,
``store``, ...; ``IGNORED``) are ignored. Any other field is refused by name, as OpenAI refuses an argument it
does not know: ignoring it (``top_k``, ``repetition_penalty``, a misspelt ``labels``) would answer another
question than the one asked. Values are taken as JSON gives them: ``true`` is no temperature, ``"0.5"`` no
number, ``5.0`` no token count.
"""

from __future__ import annotations

import base64
import sys
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.contract import ClassifyResult, EmbedResult, GenerateResult, Lane, few_names
from producer.errors import InvalidInput

# Fields of the OpenAI API that inferq cannot honour: refused with their name rather than ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "response_format", "presence_penalty", "frequency_penalty", "best_of", "echo", "suffix",
               "audio", "modalities", "prediction")
NO_OPS: dict[str, tuple[Any, ...]] = {"tool_choice": ("none",), "response_format": ({"type": "text"},),
                                      "presence_penalty": (0,), "frequency_penalty": (0,), "best_of": (1,)}
# Fields of the OpenAI API that change nothing about the answer: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "parallel_tool_calls", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention"})
# The keys a chat message may give a value: its role and content, and the participant's name, which clients
# (AutoGen, LangChain) send and the chat templates do not show. Any other must be empty (a conversation
# replayed from OpenAI's own answers has "refusal": null, "annotations": [], ...).
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
TEXT_PARTS = frozenset({"text"})  # the content parts a chat message may hold


class OpenAIBody(BaseModel):
    # strict: JSON's own types only (no true as 1.0, no "5" as 5); extra: checked by parse, then ignored
    model_config = ConfigDict(extra="allow", strict=True)
    # the OpenAI fields of this route that inferq cannot honour, and the values of them that change nothing
    unsupported: ClassVar[tuple[str, ...]] = UNSUPPORTED
    no_ops: ClassVar[dict[str, tuple[Any, ...]]] = NO_OPS

    model: str | None = None
    user: str | None = None
    # OpenAI's processing tiers: "flex" (slower, for work nobody waits on) is inferq's bulk lane, which waits
    # behind every interactive message; the others are the interactive lane
    service_tier: str | None = None  # OpenAI adds tiers now and then: any name but "flex" is interactive

    def lane(self) -> Lane:
        return "bulk" if self.service_tier == "flex" else "interactive"

    def tier(self) -> str:
        """The tier a response names: the one that served it."""
        return "flex" if self.lane() == "bulk" else "default"


class EmbeddingsBody(OpenAIBody):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None


class ClassifyBody(OpenAIBody):
    """``POST /v1/classify``, inferq's own route (OpenAI has none): ``input`` like the embeddings route's;
    ``labels`` to classify zero-shot with an embedding model, or none for a classification model's own."""

    input: str | list[str]
    labels: list[str] | None = None
    top_k: int | None = None


class SampledBody(OpenAIBody):
    """What every route over the generate task takes. None is each field's OpenAI default: sampled at
    temperature 1, top_p 1, not streamed."""

    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None

    def sampling_defaults(self) -> dict[str, float]:
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p}

    def sampling(self) -> dict[str, Any]:
        """The task's sampling kwargs (and model)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidInput("stream_options: only allowed with stream: true")  # as OpenAI answers
        return {**self.sampling_defaults(), "model": self.model}


class _GenerateBody(SampledBody):
    # None: one choice, no stop strings, no seed
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None


class ChatBody(_GenerateBody):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class CompletionBody(_GenerateBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16, the completions API's own default


def parse(shape: type[OpenAIBody], body: Any) -> Any:
    """The body as ``shape``, or InvalidInput naming every field that is wrong."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    try:
        parsed = shape.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}" for error in errors[:5])
        more = f"; and {len(errors) - 5} more problem(s)" if len(errors) > 5 else ""  # the first few say enough
        raise InvalidInput(problems + more) from None
    refused = [name for name in shape.unsupported
               if body.get(name) not in (None, False, [], {}) and body.get(name) not in shape.no_ops.get(name, ())]
    if refused:
        raise InvalidInput(f"{', '.join(refused)}: not supported by inferq")
    unknown = sorted(set(parsed.model_extra or ()) - IGNORED - set(shape.unsupported))
    if unknown:
        raise InvalidInput(f"unrecognized field(s) {few_names(unknown)}: this route takes "
                           f"{', '.join(sorted(shape.model_fields))}")
    return parsed


def embed_kwargs(body: EmbeddingsBody) -> dict[str, Any]:
    if body.dimensions is not None:
        raise InvalidInput("dimensions: not supported (the models give their own dimension)")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if any(not isinstance(text, str) for text in texts):
        raise InvalidInput("input: token ids are not accepted; send a string or a list of strings")
    return {"texts": texts, "model": body.model}


def classify_kwargs(body: ClassifyBody) -> dict[str, Any]:
    return {"texts": [body.input] if isinstance(body.input, str) else body.input, "labels": body.labels,
            "top_k": body.top_k, "model": body.model}


def classify_response(result: ClassifyResult) -> dict[str, Any]:
    return {"object": "list", "model": result["model"],
            "data": [{"object": "classification", "index": index, "labels": labels}
                     for index, labels in enumerate(result["results"])]}


def embeddings_response(result: EmbedResult, encoding: str) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(result["embeddings"]):
        embedding: Any = vector
        if encoding == "base64":  # little-endian float32, as the OpenAI SDK decodes it
            packed = array("f", vector)
            if sys.byteorder == "big":
                packed.byteswap()
            embedding = base64.b64encode(packed.tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = result.get("prompt_tokens", 0)
    return {"object": "list", "data": data, "model": result["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _sampling(body: _GenerateBody) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise InvalidInput(f"n: only 1 completion per request is supported; got {body.n}")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {**body.sampling(), "stop": stop or None, "seed": body.seed}


def new_tokens(max_tokens: int | None, default_max_tokens: int) -> dict[str, Any]:
    """The task's token limit: the one asked for, or (as OpenAI, none given) up to ``default_max_tokens`` or
    what the model's context leaves after the prompt."""
    if max_tokens is None:
        return {"max_new_tokens": default_max_tokens, "fit_new_tokens": True}
    return {"max_new_tokens": max_tokens}


def joined_text(where: str, content: Any, part_types: frozenset[str]) -> Any:
    """A message's content given as parts (``where`` names it), joined into its text: only parts of
    ``part_types``, each with a string text, else InvalidInput naming the part. Any other content is
    returned as it is, for the contract to check."""
    if not isinstance(content, list):
        return content
    for at, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if not isinstance(part, dict) or not isinstance(kind, str) or kind not in part_types:
            raise InvalidInput(f"{where}[{at}]: only {' and '.join(sorted(part_types))} parts are supported; "
                               f"got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise InvalidInput(f"{where}[{at}].text must be a string")
    return "".join(part["text"] for part in content)


def chat_kwargs(body: ChatBody, default_max_tokens: int) -> dict[str, Any]:
    """``default_max_tokens``: what a chat without max_tokens may generate (OpenAI's: up to the model's
    context; here the worker's ``max_new_tokens`` limit, fitted to what the context leaves)."""
    messages = []
    for index, message in enumerate(body.messages):
        extra = [key for key, value in message.items()
                 if key not in MESSAGE_FIELDS and value not in (None, False, [], {}, "")]
        if extra:
            raise InvalidInput(f"messages[{index}]: {few_names(extra)} not supported; a message is its role and "
                               "content (and a name)")
        content = joined_text(f"messages[{index}].content", message.get("content"), TEXT_PARTS)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        messages.append({"role": role, "content": content})
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return {"messages": messages, **new_tokens(max_tokens, default_max_tokens), **_sampling(body)}


def completion_kwargs(body: CompletionBody) -> dict[str, Any]:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidInput("prompt: send one string (token ids and several prompts are not supported)")
        prompt = prompt[0]
    return {"prompt": prompt, "max_new_tokens": 16 if body.max_tokens is None else body.max_tokens,
            **_sampling(body)}


def usage(result: GenerateResult) -> dict[str, int]:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


class Generation(BaseModel):
    """What a chat or completion response is made of, whichever of the two it is."""

    id: str
    chat: bool
    tier: str = "default"  # the service_tier that served it
    created: int = Field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def response(self, result: GenerateResult) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                      "finish_reason": result["finish_reason"], "logprobs": None}
        else:
            choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
        return {"id": self.id, "object": self.object, "created": self.created, "model": result["model"],
                "choices": [choice], "usage": usage(result), "service_tier": self.tier}

    def chunk(self, model: str, piece: str | None = None, finish_reason: str | None = None,
              first: bool = False, usage: dict[str, int] | None = None) -> dict[str, Any]:
        """One server-sent event's payload of a streamed response."""
        choices: list[dict[str, Any]] = []
        if usage is None:
            if self.chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if piece:
                    delta["content"] = piece
                choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            else:
                choices = [{"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}]
        payload: dict[str, Any] = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                                   "created": self.created, "model": model, "choices": choices,
                                   "service_tier": self.tier}
        if usage is not None:
            payload["usage"] = usage
        return payload


def sse(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event: ``payload`` as JSON (bytes as they are), named ``event`` if given."""
    named = b"event: " + event.encode() + b"\n" if event else b""
    return named + b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"


class StreamEvents(ABC):
    """How a route writes a streamed generation as server-sent events: its opening (with the first piece,
    read before the response started), each piece, its ending, or the failure that ends it mid-way."""

    @abstractmethod
    def opening(self, first: str | None) -> Iterable[bytes]: ...

    @abstractmethod
    def piece(self, text: str) -> bytes: ...

    @abstractmethod
    def ending(self, stream: Any) -> Iterable[bytes]:
        """``stream``: the GenerationStream read to its end (finish_reason, model and token counts set)."""

    @abstractmethod
    def failure(self, error: dict[str, Any]) -> Iterable[bytes]:
        """``error``: OpenAI's error object (message, type, param, code)."""


class CompletionEvents(StreamEvents):
    """A chat or completion as OpenAI's chunks, ending with ``data: [DONE]``; with ``include_usage``, a last
    chunk of no choices holds the usage."""

    def __init__(self, generation: Generation, model: str, include_usage: bool) -> None:
        self.generation, self.model, self.include_usage = generation, model, include_usage

    def opening(self, first: str | None) -> Iterable[bytes]:
        yield sse(self.generation.chunk(self.model, first, first=True))

    def piece(self, text: str) -> bytes:
        return sse(self.generation.chunk(self.model, text))

    def ending(self, stream: Any) -> Iterable[bytes]:
        yield sse(self.generation.chunk(stream.model or self.model, finish_reason=stream.finish_reason))
        if self.include_usage:
            counts = {"prompt_tokens": stream.prompt_tokens or 0, "completion_tokens": stream.completion_tokens or 0}
            yield sse(self.generation.chunk(self.model, usage={**counts, "total_tokens": sum(counts.values())}))
        yield sse(b"[DONE]")

    def failure(self, error: dict[str, Any]) -> Iterable[bytes]:
        yield sse({"error": error})
        yield sse(b"[DONE]")


class GenerateRoute(ABC):
    """One OpenAI route over the generate task: its body, the task's kwargs, and its answer, whole or
    streamed. ``default_max_tokens`` is what a request without a token limit may generate (OpenAI's: up to
    the model's context; here the worker's ``max_new_tokens`` limit, fitted to what the context leaves), and
    ``default_model`` what a streamed chunk names before the worker said which model ran."""

    shape: type[OpenAIBody]

    def __init__(self, default_max_tokens: int, default_model: str) -> None:
        self.default_max_tokens, self.default_model = default_max_tokens, default_model

    @abstractmethod
    def kwargs(self, body: Any) -> dict[str, Any]: ...

    @abstractmethod
    def answer(self, task_id: str, body: Any, result: GenerateResult) -> dict[str, Any]: ...

    @abstractmethod
    def events(self, task_id: str, body: Any) -> StreamEvents: ...


class CompletionRoute(GenerateRoute):
    """``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""

    def __init__(self, chat: bool, default_max_tokens: int, default_model: str) -> None:
        super().__init__(default_max_tokens, default_model)
        self.chat = chat
        self.shape = ChatBody if chat else CompletionBody
        self._prefix = "chatcmpl-" if chat else "cmpl-"

    def kwargs(self, body: Any) -> dict[str, Any]:
        return chat_kwargs(body, self.default_max_tokens) if self.chat else completion_kwargs(body)

    def answer(self, task_id: str, body: Any, result: GenerateResult) -> dict[str, Any]:
        return Generation(id=self._prefix + task_id, chat=self.chat, tier=body.tier()).response(result)

    def events(self, task_id: str, body: Any) -> StreamEvents:
        return CompletionEvents(Generation(id=self._prefix + task_id, chat=self.chat, tier=body.tier()),
                                body.model or self.default_model,
                                bool((body.stream_options or {}).get("include_usage")))
