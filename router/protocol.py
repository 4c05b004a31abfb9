"""OpenAI request models: only the fields the gateway reads; everything else is forwarded.

Field order follows the official API reference:
https://platform.openai.com/docs/api-reference/chat/create
https://platform.openai.com/docs/api-reference/completions/create
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
]

# Upper bound on `n`: every choice is generated upstream, so a huge `n` is a
# cost and capacity hazard rather than a legitimate request.
MAX_N = 16


class OpenAIBaseModel(BaseModel):
    """Unknown fields are kept and forwarded upstream (sampling extras, newer params)."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(OpenAIBaseModel):
    """One conversation turn; content is a string or a list of typed parts."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(OpenAIBaseModel):
    """`stream_options` of a streaming request."""

    include_usage: bool | None = None


class _SamplingLimits(OpenAIBaseModel):
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingLimits):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_SamplingLimits):
    """POST /v1/completions body."""

    model: str = Field(min_length=1)
    prompt: str | list[str] = Field(min_length=1)
