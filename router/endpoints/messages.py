"""Anthropic Messages (`POST /v1/messages`), spoken natively or translated to chat completions.

An upstream that speaks Messages itself (Anthropic's API, llama-server, vLLM) gets the
request as sent and answers in Messages; the methods below read that answer and its
stream. Any other upstream is asked through chat completions (`MessagesViaChat`).
Errors go out in Anthropic's envelope, `{"type": "error", "error": {"type", "message"}}`,
which the official `anthropic` SDK parses into its typed exceptions.

The request models hold what both paths serve, so the OpenAPI document says it exactly:
text, image (base64 or URL) and tool_result (text) blocks in user turns; text, tool_use,
thinking and redacted_thinking blocks in assistant turns; a system prompt as a string or
text blocks; custom tools and the four forms of `tool_choice`. Unknown fields are kept.

Request reference: https://docs.anthropic.com/en/api/messages
Streaming events: https://docs.anthropic.com/en/docs/build-with-claude/streaming
Errors: https://docs.anthropic.com/en/api/errors
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NotRequired

import orjson
from pydantic import (
    Field,
    Tag,
)
from typing_extensions import TypedDict

from router.accounting import Usage, token_count
from router.endpoints.base import Malformed, Prompt, StreamAnswer, WireFormat, event_json
from router.endpoints.chat import chat_prompt
from router.endpoints.messages_chat import MessagesViaChat
from router.endpoints.schema import WholeNumber, forwarded, string_or, untagged
from router.errors import GatewayError, UpstreamStatus, has_error_message
from router.protocol import OpenAIBaseModel, TokenCount
from router.quality import Answer

__all__ = [
    "AnthropicMessage",
    "AssistantMessage",
    "CountTokensFormat",
    "CountTokensRequest",
    "MessagesFormat",
    "MessagesRequest",
    "UserMessage",
]


# --- request models: what the gateway serves, so the OpenAPI document says it exactly --------


@forwarded
class TextBlock(TypedDict):
    """A `text` content block (`cache_control`, `citations` and other fields are forwarded)."""

    type: Literal["text"]
    text: str


@forwarded
class Base64Source(TypedDict):
    """An image given inline."""

    type: Literal["base64"]
    media_type: str
    data: str


@forwarded
class UrlSource(TypedDict):
    """An image given by URL."""

    type: Literal["url"]
    url: str


@forwarded
class ImageBlock(TypedDict):
    """An `image` block: base64 data or a URL (files by id are not supported)."""

    type: Literal["image"]
    source: Annotated[Annotated[Base64Source | UrlSource, Field(discriminator="type")], untagged(0)]


@forwarded
class ToolUseBlock(TypedDict):
    """A tool call the assistant made."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


@forwarded
class ToolResultBlock(TypedDict):
    """A tool's result, in a user turn: text only (a string or text blocks)."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: NotRequired[
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[TextBlock], Tag("list")],
            string_or("text blocks"),
            untagged(0),
        ]
        | None
    ]
    is_error: NotRequired[bool | None]


@forwarded
class ThinkingBlock(TypedDict):
    """The assistant's reasoning, sent back (dropped on the way to a chat-completions model)."""

    type: Literal["thinking"]
    thinking: str
    signature: str


@forwarded
class RedactedThinkingBlock(TypedDict):
    """Encrypted reasoning, sent back (dropped on the way to a chat-completions model)."""

    type: Literal["redacted_thinking"]
    data: str


UserBlock = Annotated[TextBlock | ImageBlock | ToolResultBlock, Field(discriminator="type")]
AssistantBlock = Annotated[
    TextBlock | ToolUseBlock | ThinkingBlock | RedactedThinkingBlock, Field(discriminator="type")
]


@forwarded
class UserMessage(TypedDict):
    """A user turn: text, images and tool results."""

    role: Literal["user"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[UserBlock], Tag("list")],
        string_or("content blocks"),
        untagged(0, 2),
    ]


@forwarded
class AssistantMessage(TypedDict):
    """An assistant turn: text, tool calls and reasoning."""

    role: Literal["assistant"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[AssistantBlock], Tag("list")],
        string_or("content blocks"),
        untagged(0, 2),
    ]


AnthropicMessage = Annotated[UserMessage | AssistantMessage, Field(discriminator="role")]


@forwarded
class CustomTool(TypedDict):
    """A custom tool (server tools such as web search are not supported)."""

    type: NotRequired[Literal["custom"] | None]
    name: str
    description: NotRequired[str | None]
    input_schema: dict[str, Any]


@forwarded
class AutoChoice(TypedDict):
    """The model decides whether to call a tool."""

    type: Literal["auto"]
    disable_parallel_tool_use: NotRequired[bool | None]


@forwarded
class AnyChoice(TypedDict):
    """The model must call some tool."""

    type: Literal["any"]
    disable_parallel_tool_use: NotRequired[bool | None]


@forwarded
class NoneChoice(TypedDict):
    """The model must not call a tool."""

    type: Literal["none"]


@forwarded
class ToolChoice(TypedDict):
    """The model must call the named tool."""

    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: NotRequired[bool | None]


class CountTokensRequest(OpenAIBaseModel):
    """POST /v1/messages/count_tokens body: a Messages request without the sampling fields.

    Fields ordered as in https://docs.anthropic.com/en/api/messages-count-tokens
    """

    messages: Annotated[list[AnthropicMessage], Field(min_length=1), untagged(1)]
    model: str = Field(min_length=1)
    system: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[TextBlock], Tag("list")],
            string_or("text blocks"),
            untagged(0),
        ]
        | None
    ) = None
    thinking: dict[str, Any] | None = None
    tool_choice: (
        Annotated[
            Annotated[AutoChoice | AnyChoice | NoneChoice | ToolChoice, Field(discriminator="type")],
            untagged(0),
        ]
        | None
    ) = None
    tools: list[CustomTool] | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages body. `max_tokens` is required, as in Anthropic's API."""

    max_tokens: TokenCount
    metadata: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_k: WholeNumber | None = None
    top_p: float | None = None


# Gateway status → Anthropic error type (https://docs.anthropic.com/en/api/errors). A 413
# is `invalid_request_error`: the SDK's typed error union has no `request_too_large`.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Gateway error type (as errors after the first byte name it) → Anthropic's.
_EVENT_ERROR_TYPES = {
    "upstream_timeout": "timeout_error",
    "timeout_error": "timeout_error",
    "overloaded": "overloaded_error",
    "overloaded_error": "overloaded_error",
}
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _envelope(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def _is_anthropic_error(parsed: Any) -> bool:
    # What the anthropic SDK reads: `type: "error"` and an `error` with string type and message.
    if not isinstance(parsed, dict) or parsed.get("type") != "error":
        return False
    error = parsed.get("error")
    return (
        isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("message"), str)
    )


def _json(value: Any) -> str:
    # Parsed JSON can still fail to serialise: an integer past 64 bits, nesting past orjson's limit.
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return ""


def _finish(reason: Any) -> str | None:
    if not isinstance(reason, str):
        return None
    return _STOP_REASONS.get(reason, reason)


def _prompt_tokens(usage: dict[str, Any]) -> int | None:
    """input + cache creation + cache reads (Messages reports the three apart); None without input."""
    total = usage.get("input_tokens")
    if not token_count(total):
        return None
    for key in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        extra = usage.get(key)
        if token_count(extra):  # null when the request used no cache
            total += extra
    return max(total, 0)


def _dict(obj: Any, key: str) -> dict[str, Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


# The Messages API version sent to upstreams that speak it (the one its SDKs send).
ANTHROPIC_VERSION = "2023-06-01"


class MessagesFormat(WireFormat):
    """`POST /v1/messages` (and the estimate `POST /v1/messages/count_tokens` answers with)."""

    name = "messages"
    path = "/v1/messages"
    summary = "Create a message, Anthropic Messages API (routed)"
    upstream_path = "/messages"
    request_model: ClassVar[type[OpenAIBaseModel]] = MessagesRequest
    via_chat: ClassVar[MessagesViaChat] = MessagesViaChat()
    openai_errors = False

    def upstream_headers(self, api_key: str | None) -> dict[str, str]:
        # A server that speaks Messages reads its key and the API version here.
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    # --- requests -------------------------------------------------------------------------

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        # Read through the chat translation, so a request is sized and scored the same
        # whichever format the upstream speaks; `max_tokens` becomes the budget there.
        as_chat = self.via_chat.request(payload)
        prompt = chat_prompt(as_chat)
        prompt.as_chat = as_chat
        return prompt

    # --- answers --------------------------------------------------------------------------

    def well_shaped(self, parsed: Any) -> bool:
        """A `message` object whose `content` is a list of blocks and `usage` an object if present."""
        if not isinstance(parsed, dict) or parsed.get("type") != "message":
            return False
        content = parsed.get("content")
        if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
            return False
        return parsed.get("usage") is None or isinstance(parsed.get("usage"), dict)

    def answer(self, parsed: Any) -> Answer:
        """Text of the `text` blocks, `tool_use` blocks as tool calls, the stop reason in chat terms."""
        content = parsed.get("content") if isinstance(parsed, dict) else None
        texts: list[str] = []
        calls: list[Any] = []
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif block.get("type") == "tool_use":
                name = block.get("name")
                fn = {"name": name if isinstance(name, str) else "", "arguments": _json(block.get("input"))}
                calls.append({"function": fn})
        stop = parsed.get("stop_reason") if isinstance(parsed, dict) else None
        return Answer(text="".join(texts), finish_reason=_finish(stop), tool_calls=calls)

    def usage(self, parsed: Any) -> Usage | None:
        """Input (with cache creation and reads) and output tokens of a Message."""
        usage = _dict(parsed, "usage")
        prompt = _prompt_tokens(usage)
        completion = usage.get("output_tokens", 0)
        if prompt is None or not token_count(completion):
            return None
        return Usage(prompt, max(completion, 0))

    # --- streams --------------------------------------------------------------------------

    def decode_event(self, event: bytes) -> Any:
        """The event's JSON object (`ping` included); None for an event without data.

        Raises Malformed unless the data is a JSON object with a string `type`.
        """
        obj = event_json(event)
        if obj is None:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise Malformed
        return obj

    def ends(self, obj: Any, done: bool) -> bool:
        """A Messages stream is complete at `message_stop`."""
        return done or (isinstance(obj, dict) and obj.get("type") == "message_stop")

    def stream_error(self, obj: Any) -> bool:
        """An `error` event."""
        return isinstance(obj, dict) and obj.get("type") == "error"

    def event_usage(self, obj: Any, so_far: Usage | None) -> Usage | None:
        """`message_start` gives the input (and first output) tokens; each `message_delta` the
        cumulative output tokens, and the input tokens again when it carries them.

        Without a known input count the usage stays unknown (the gateway then estimates it).
        """
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "message_start":
            usage = _dict(_dict(obj, "message"), "usage")
            prompt = _prompt_tokens(usage)
            output = usage.get("output_tokens", 0)
            if prompt is None:
                return so_far
            return Usage(prompt, max(output, 0) if token_count(output) else 0)
        if kind == "message_delta":
            usage = _dict(obj, "usage")
            prompt = _prompt_tokens(usage)
            if prompt is None:
                prompt = so_far.prompt_tokens if so_far is not None else None
            output = usage.get("output_tokens")
            if not token_count(output):
                output = so_far.completion_tokens if so_far is not None else 0
            return Usage(prompt, max(output, 0)) if prompt is not None else so_far
        return so_far

    def carries_answer(self, obj: Any) -> bool:
        """Every Messages event belongs to the answer; usage rides on its start and delta events."""
        return True

    def feed(self, answer: StreamAnswer, obj: Any) -> None:
        """Add text deltas, tool calls (by block index) and the stop reason to the answer."""
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_start":
            block = _dict(obj, "content_block")
            if block.get("type") == "tool_use":
                answer.tool_delta(obj.get("index"), block.get("name"), None)
        elif kind == "content_block_delta":
            answer.events += 1
            delta = _dict(obj, "delta")
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                answer.text.append(delta["text"])
            elif delta.get("type") == "input_json_delta":
                answer.tool_delta(obj.get("index"), None, delta.get("partial_json"))
        elif kind == "message_delta":
            finish = _finish(_dict(obj, "delta").get("stop_reason"))
            if finish is not None:
                answer.finish_reason = finish

    # --- errors on this wire --------------------------------------------------------------

    def error_body(self, exc: GatewayError) -> bytes:
        """Anthropic's error envelope; an upstream's own error when it is in that envelope already.

        An upstream's OpenAI-shaped error keeps its message; any other upstream body is
        replaced by the gateway's message, so no upstream text (an HTML page, a proxy's
        internal address) reaches the client.
        """
        message = exc.message
        if isinstance(exc, UpstreamStatus):
            parsed = exc.parsed()
            if _is_anthropic_error(parsed):
                return exc.content
            if has_error_message(parsed):
                message = parsed["error"]["message"]
        return orjson.dumps(_envelope(_error_type(exc.status_code), message))

    def error_event(self, message: str, type_: str) -> bytes:
        """An `error` event: `api_error`, or the timeout or overload it was."""
        envelope = _envelope(_EVENT_ERROR_TYPES.get(type_, "api_error"), message)
        return b"event: error\ndata: " + orjson.dumps(envelope) + b"\n\n"


class CountTokensFormat(MessagesFormat):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`, never sent upstream.

    Its answer is the routing policy's own size estimate of the prompt (`router/app.py`).
    """

    path = "/v1/messages/count_tokens"
    summary = "Estimate the input tokens of an Anthropic Messages request"
    request_model = CountTokensRequest
