"""OpenAI request models: only the fields the gateway reads; everything else is forwarded.

Field order follows the official API reference:
https://platform.openai.com/docs/api-reference/chat/create
https://platform.openai.com/docs/api-reference/completions/create
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

__all__ = [
    "whole_number",
    "answer_well_shaped",
    "chunk_well_shaped",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
]

# Upper bound on `n`: every choice is generated upstream, so a huge `n` is a
# cost and capacity hazard rather than a legitimate request.
MAX_N = 16


# Token counts past this are not a real request (and would overflow upstream integer types).
MAX_TOKENS = 10_000_000


def whole_number(value: Any) -> Any:
    """16.0 as 16 (JSON has one number type); anything else as it is, for the validator to judge."""
    # JSON has one number type: 16.0 is a valid integer in JSON Schema, "16" is not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[
    int,
    BeforeValidator(whole_number),
    Field(ge=1, le=MAX_TOKENS),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}),
]
ChoiceCount = Annotated[
    int,
    BeforeValidator(whole_number),
    Field(ge=1, le=MAX_N),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_N}),
]


class OpenAIBaseModel(BaseModel):
    """Unknown fields are kept and forwarded upstream (sampling extras, newer params).

    Strict: the body is forwarded as sent, so a value pydantic would coerce
    (`"12"` for 12, `"yes"` for true) must be rejected rather than passed on.
    """

    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(OpenAIBaseModel):
    """One conversation turn; content is a string or a list of typed parts."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(OpenAIBaseModel):
    """`stream_options` of a streaming request."""

    include_usage: bool | None = None


class _SamplingLimits(OpenAIBaseModel):
    max_tokens: TokenCount | None = None
    n: ChoiceCount | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingLimits):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None


class CompletionRequest(_SamplingLimits):
    """POST /v1/completions body."""

    model: str = Field(min_length=1)
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]


# --- Upstream answers: the shapes the gateway reads --------------------------------------
# A body or chunk of another shape is an upstream protocol error (retry or fallback
# before the first byte, an error event after it), never passed on as an answer.


def _optional(value: Any, kind: type | tuple[type, ...]) -> bool:
    return value is None or isinstance(value, kind)


def chunk_well_shaped(obj: Any) -> bool:
    """Whether a chunk has the types the gateway reads: an object whose `choices` is a
    list of objects with a dict `delta`, string `text`/`finish_reason`/`content`, dict
    `logprobs`, a list of tool-call objects; a dict `usage`. An `error` object passes as is.
    """
    if not isinstance(obj, dict):
        return False
    if "error" in obj:
        return True
    if not _optional(obj.get("usage"), dict):
        return False
    choices = obj.get("choices")
    if choices is None:
        return True
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        delta = choice.get("delta")
        if not (
            _optional(delta, dict)
            and _optional(choice.get("text"), str)
            and _optional(choice.get("finish_reason"), str)
            and _optional(choice.get("logprobs"), dict)
        ):
            return False
        if delta is not None and not (
            _optional(delta.get("content"), str) and _tool_calls_shaped(delta.get("tool_calls"))
        ):
            return False
    return True


def _tool_calls_shaped(calls: Any) -> bool:
    if calls is None:
        return True
    if not isinstance(calls, list):
        return False
    for call in calls:
        if not isinstance(call, dict):
            return False
        index = call.get("index")
        fn = call.get("function")
        if not _optional(index, int) or isinstance(index, bool) or not _optional(fn, dict):
            return False
        if fn is not None and not (_optional(fn.get("name"), str) and _optional(fn.get("arguments"), str)):
            return False
    return True


def answer_well_shaped(obj: Any, chat: bool) -> bool:
    """Whether a non-streaming answer has the shape clients rely on: at least one choice,
    each an object with a `message` object (chat: string or null `content`, well-formed
    `tool_calls`) or a string `text` (completions), and string or null `finish_reason`.
    """
    if not isinstance(obj, dict) or not _optional(obj.get("usage"), dict):
        return False
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or not (
            _optional(choice.get("finish_reason"), str) and _optional(choice.get("logprobs"), dict)
        ):
            return False
        if chat:
            message = choice.get("message")
            if not isinstance(message, dict) or not _optional(message.get("content"), str):
                return False
            calls = message.get("tool_calls")
            if calls is not None and not (isinstance(calls, list) and all(_full_tool_call(c) for c in calls)):
                return False
        elif not isinstance(choice.get("text"), str):
            return False
    return True


def _full_tool_call(call: Any) -> bool:
    if not isinstance(call, dict):
        return False
    fn = call.get("function")
    return isinstance(fn, dict) and _optional(fn.get("name"), str) and _optional(fn.get("arguments"), str)
