"""OpenAI's Responses API (``POST /v1/responses``) over inferq's generate task: its text in, text out part.

A request is ``input`` (a string, or a list of messages: a role and a content that is a string or text parts,
as the SDK sends them, and as a previous response's output items replay) and ``instructions`` (a system
message before them), with ``max_output_tokens``, ``temperature`` and ``top_p``. The answer is a response
object holding one assistant message of one ``output_text`` part; streamed, OpenAI's typed events, from
``response.created`` to ``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it,
``response.failed`` with the error when the generation failed mid-way).

inferq keeps no response: ``store`` is ignored (nothing is retrievable), and ``previous_response_id`` and
``conversation``, which would need it, are refused by name, as are tools, reasoning, images and files.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from producer.contract import GenerateResult, few_names
from producer.errors import InvalidInput
from producer.gateway.shapes import GenerateRoute, SampledBody, StreamEvents, joined_text, new_tokens, sse

UNSUPPORTED = ("tools", "tool_choice", "previous_response_id", "conversation", "reasoning", "include",
               "background", "text", "truncation", "prompt", "max_tool_calls", "top_logprobs", "context_management")
NO_OPS: dict[str, tuple[Any, ...]] = {"tool_choice": ("none", "auto"), "text": ({"format": {"type": "text"}},),
                                      "truncation": ("disabled",)}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# The keys an input message may give a value besides its role and content: those of a previous response's
# output message, replayed as the SDK's docs show (its id and status change nothing here).
MESSAGE_FIELDS = frozenset({"type", "role", "content", "id", "status"})
TEXT_PARTS = frozenset({"input_text", "output_text"})


class ResponsesBody(SampledBody):  # its stream_options' include_obfuscation: no obfuscation is ever added
    unsupported = UNSUPPORTED
    no_ops = NO_OPS

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None


def responses_kwargs(body: ResponsesBody, default_max_tokens: int) -> dict[str, Any]:
    """The generate task's kwargs; ``default_max_tokens`` as for a chat without ``max_tokens``."""
    sampling = body.sampling()
    messages = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages += [_message(index, item) for index, item in enumerate(body.input)]
    return {"messages": messages, **new_tokens(body.max_output_tokens, default_max_tokens), **sampling}


def _message(index: int, item: Any) -> dict[str, str]:
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be a message object ({{\"role\", \"content\"}})")
    if (item.get("type") or "message") != "message":
        raise InvalidInput(f"{where}: items of type {item.get('type')!r} are not supported; only messages are")
    extra = [key for key, value in item.items() if key not in MESSAGE_FIELDS and value not in (None, [], {}, "")]
    if extra:
        raise InvalidInput(f"{where}: {few_names(extra)} not supported; a message is its role and content")
    role = ROLES.get(item["role"]) if isinstance(item.get("role"), str) else None
    if role is None:
        raise InvalidInput(f"{where}.role must be one of {', '.join(ROLES)}; got {item.get('role')!r}")
    content = joined_text(f"{where}.content", item.get("content"), TEXT_PARTS)
    if not isinstance(content, str):
        raise InvalidInput(f"{where}.content must be a string or a list of text parts")
    return {"role": role, "content": content}


class Reply:
    """One response: its object, whole or as it stands while streamed, and the ids it names."""

    def __init__(self, task_id: str, body: ResponsesBody, model: str) -> None:
        self.id, self.message_id = f"resp_{task_id}", f"msg_{task_id}"
        self.created_at = int(time.time())
        self.body, self.model = body, model

    def response(self, status: str, text: str | None = None, result: GenerateResult | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object; ``status`` is in_progress, completed, incomplete or failed."""
        output = [] if text is None else [self.message(text, "completed" if status == "completed" else
                                                       "incomplete")]
        usage = None
        if result is not None:
            prompt, completion = result["prompt_tokens"], result["completion_tokens"]
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": result["model"] if result is not None else self.model, "output": output,
                "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
                else None, "instructions": self.body.instructions, "max_output_tokens": self.body.max_output_tokens,
                **self.body.sampling_defaults(), "parallel_tool_calls": False,
                "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled",
                "store": False, "metadata": {}, "usage": usage, "service_tier": self.body.tier()}

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [self.part(text)] if status != "in_progress" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def answer(self, result: GenerateResult) -> dict[str, Any]:
        return self.response(ended(result["finish_reason"]), result["text"], result)


def ended(finish_reason: str | None) -> str:
    """A response's status for a generation's finish reason: cut by its token limit, it is incomplete."""
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseEvents(StreamEvents):
    """A streamed response as OpenAI's typed server-sent events, numbered in order."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.text = ""
        self._sequence = 0

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse(payload, event=kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.reply.message_id, "output_index": 0, "content_index": 0}

    def opening(self, first: str | None) -> Iterable[bytes]:
        started = self.reply.response("in_progress")
        yield self._event("response.created", response=started)
        yield self._event("response.in_progress", response=started)
        yield self._event("response.output_item.added", output_index=0,
                          item=self.reply.message("", "in_progress"))
        yield self._event("response.content_part.added", **self._where(), part=self.reply.part(""))
        if first:
            yield self.piece(first)

    def piece(self, text: str) -> bytes:
        self.text += text
        return self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def ending(self, stream: Any) -> Iterable[bytes]:
        status = ended(stream.finish_reason)
        yield self._event("response.output_text.done", **self._where(), text=self.text, logprobs=[])
        yield self._event("response.content_part.done", **self._where(), part=self.reply.part(self.text))
        yield self._event("response.output_item.done", output_index=0, item=self.reply.message(self.text, status))
        result: GenerateResult = {"text": self.text, "finish_reason": stream.finish_reason,
                                  "model": stream.model or self.reply.model, "prompt_tokens": stream.prompt_tokens or 0,
                                  "completion_tokens": stream.completion_tokens or 0}
        yield self._event(f"response.{status}", response=self.reply.response(status, self.text, result))

    def failure(self, error: dict[str, Any]) -> Iterable[bytes]:
        """The text sent so far stays, as an incomplete message. OpenAI's error codes are a fixed list: inferq's
        own (Cancelled, ResultTimeout, ...) goes in ``type``."""
        code = "rate_limit_exceeded" if error.get("type") == "rate_limit_error" else "server_error"
        failed = {"code": code, "message": error.get("message"), "type": error.get("code") or error.get("type")}
        yield self._event("response.failed", response=self.reply.response("failed", self.text, error=failed))



class ResponsesRoute(GenerateRoute):
    """``POST /v1/responses``."""

    shape = ResponsesBody

    def kwargs(self, body: Any) -> dict[str, Any]:
        return responses_kwargs(body, self.default_max_tokens)

    def answer(self, task_id: str, body: Any, result: GenerateResult) -> dict[str, Any]:
        return Reply(task_id, body, result["model"]).answer(result)

    def events(self, task_id: str, body: Any) -> StreamEvents:
        return ResponseEvents(Reply(task_id, body, body.model or self.default_model))
