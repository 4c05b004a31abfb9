"""OpenAI request models: only the fields the gateway reads; everything else is forwarded.

Field order follows the official API reference:
https://platform.openai.com/docs/api-reference/chat/create
https://platform.openai.com/docs/api-reference/completions/create
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

__all__ = [
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


def _whole_number(value: Any) -> Any:
    # JSON has one number type: 16.0 is a valid integer in JSON Schema, "16" is not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[
    int,
    BeforeValidator(_whole_number),
    Field(ge=1, le=MAX_TOKENS),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}),
]
ChoiceCount = Annotated[
    int,
    BeforeValidator(_whole_number),
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
