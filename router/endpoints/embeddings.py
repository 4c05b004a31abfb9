"""OpenAI embeddings (`POST /v1/embeddings`): passed through to an embedding model, never scored.

The answer is metered like any other (prompt tokens and cost), and an embedding
model's counterfactual is itself: there is no teacher for embeddings to save against.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)

from router.accounting import Usage, counted_usage
from router.endpoints.base import Malformed, Prompt, StreamAnswer, WireFormat
from router.protocol import OpenAIBaseModel, whole_number
from router.quality import Answer

__all__ = ["EmbeddingRequest", "EmbeddingsFormat"]

# Inputs one request may carry, as OpenAI's own limit.
MAX_INPUTS = 2048


def whole_numbers(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # JSON has one number type: a token id may come as 16.0. A list of integers is checked at
    # native speed; only a list that failed (one holding such floats) is read again.
    try:
        return handler(value)
    except ValidationError:
        if not isinstance(value, list):
            raise
        return handler([whole_number(v) for v in value])


_DIMENSIONS = {"type": "integer", "minimum": 1}
_Text = Annotated[str, Field(min_length=1)]
_Tokens = Annotated[list[int], Field(min_length=1), WrapValidator(whole_numbers)]


class EmbeddingRequest(OpenAIBaseModel):
    """POST /v1/embeddings body (https://platform.openai.com/docs/api-reference/embeddings/create)."""

    # No input may be empty, as OpenAI's own API: an empty string or token list has nothing to embed.
    input: (
        _Text
        | Annotated[list[_Text], Field(min_length=1, max_length=MAX_INPUTS)]
        | _Tokens
        | Annotated[list[_Tokens], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    model: str = Field(min_length=1)
    encoding_format: str | None = None
    dimensions: (
        Annotated[int, BeforeValidator(whole_number), Field(ge=1), WithJsonSchema(_DIMENSIONS)] | None
    ) = None


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        # Token ids: four characters a token keeps the estimate in the units of the rest.
        return sum(_chars(v) if isinstance(v, str | list) else 4 for v in value)
    return 0


class EmbeddingsFormat(WireFormat):
    """`POST /v1/embeddings`."""

    name = "embeddings"
    path = "/v1/embeddings"
    summary = "Create embeddings (passed to the embedding model)"
    upstream_path = "/embeddings"
    request_model = EmbeddingRequest
    scored = False

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        return Prompt(text="", chars=_chars(payload["input"]))

    def wants_stream(self, payload: Any) -> bool:
        return False

    def well_shaped(self, parsed: Any) -> bool:
        if not isinstance(parsed, dict) or not isinstance(parsed.get("data"), list):
            return False
        usage = parsed.get("usage")
        return usage is None or isinstance(usage, dict)

    def answer(self, parsed: Any) -> Answer:
        return Answer()

    def usage(self, parsed: Any) -> Usage | None:
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        return counted_usage(usage, "prompt_tokens", "completion_tokens")  # no completion: 0

    def decode_event(self, event: bytes) -> Any:
        raise Malformed  # embeddings never stream

    def feed(self, answer: StreamAnswer, obj: Any) -> None:
        return None
