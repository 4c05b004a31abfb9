"""OpenAI Responses API (`POST /v1/responses`).

Served natively by an upstream that speaks it (vLLM and llama-server do), or through
chat completions by `ResponsesViaChat` (responses_chat.py). The request model holds what
both paths serve: messages, function calls and their outputs, reasoning items, function
tools, and text, JSON-object or JSON-schema output. The gateway stores nothing, so the
stateful parts of the API (`previous_response_id`, `store: true`, `background`,
`conversation`, stored `prompt` templates) are documented as null (or false) only and
refused by `check` with a 400 that says what to send instead.

Request fields follow https://platform.openai.com/docs/api-reference/responses/create;
stream events https://platform.openai.com/docs/api-reference/responses-streaming.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

import orjson
from pydantic import Discriminator, Field, Tag, WithJsonSchema
from typing_extensions import TypedDict

from router.accounting import Usage, counted_usage
from router.endpoints.base import Malformed, Prompt, StreamAnswer, WireFormat, event_json
from router.endpoints.chat import chat_prompt
from router.endpoints.responses_chat import ResponsesViaChat
from router.endpoints.schema import forwarded, string_or, untagged
from router.errors import InvalidRequest
from router.protocol import OpenAIBaseModel, TokenCount
from router.quality import Answer, logprob_values

__all__ = ["ResponsesFormat", "ResponsesRequest"]

_FINAL = ("response.completed", "response.incomplete")
_VIA_CHAT = ResponsesViaChat()


# --- request models: what the gateway serves, so the OpenAPI document says it exactly --------


@forwarded
class InputText(TypedDict):
    """Text the client wrote."""

    type: Literal["input_text"]
    text: str


@forwarded
class InputImage(TypedDict):
    """An image by URL or data URL (files by id are not supported: there is no file store)."""

    type: Literal["input_image"]
    image_url: str
    detail: NotRequired[str | None]
    file_id: NotRequired[None]


@forwarded
class OutputText(TypedDict):
    """Text the model wrote, sent back (`annotations`, `logprobs` are forwarded)."""

    type: Literal["output_text"]
    text: str


@forwarded
class RefusalPart(TypedDict):
    """A refusal the model wrote, sent back."""

    type: Literal["refusal"]
    refusal: str


_UserPart = Annotated[InputText | InputImage | OutputText | RefusalPart, Field(discriminator="type")]
_TextPart = Annotated[InputText | OutputText | RefusalPart, Field(discriminator="type")]
_OutputPart = Annotated[InputText | OutputText, Field(discriminator="type")]


@forwarded
class UserMessageItem(TypedDict):
    """A user message: text and images."""

    type: NotRequired[Literal["message"] | None]
    role: Literal["user"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[_UserPart], Tag("list")],
        string_or("content parts"),
        untagged(0, 2),
    ]


@forwarded
class MessageItem(TypedDict):
    """An assistant, system or developer message: text only."""

    type: NotRequired[Literal["message"] | None]
    role: Literal["assistant", "system", "developer"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[_TextPart], Tag("list")],
        string_or("content parts"),
        untagged(0, 2),
    ]


@forwarded
class FunctionCallItem(TypedDict):
    """A function call the model made, sent back."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


@forwarded
class FunctionCallOutputItem(TypedDict):
    """A function's result: a string or text parts."""

    type: Literal["function_call_output"]
    call_id: str
    output: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[_OutputPart], Tag("list")],
        string_or("text parts"),
        untagged(0, 2),
    ]


@forwarded
class ReasoningItem(TypedDict):
    """The model's reasoning, sent back (a chat-completions model does not read it)."""

    type: Literal["reasoning"]


_ITEM_TYPES = ("function_call", "function_call_output", "reasoning")


def _item_kind(item: Any) -> str | None:
    # A message's `type` may be left out; its role decides which parts it may hold.
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind is None or kind == "message":
        role = item.get("role")
        if role == "user":
            return "user"
        return "message" if role in ("assistant", "system", "developer") else None
    return kind if isinstance(kind, str) and kind in _ITEM_TYPES else None


_Item = Annotated[
    Annotated[UserMessageItem, Tag("user")]
    | Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_kind,
        custom_error_type="input_item",
        custom_error_message=(
            "An input item should be a message with role user, assistant, system or developer, "
            "or an item of type function_call, function_call_output or reasoning"
        ),
    ),
]


@forwarded
class FunctionTool(TypedDict):
    """A function the model may call (hosted tools such as web search are not supported)."""

    type: Literal["function"]
    name: str
    description: NotRequired[str | None]
    parameters: NotRequired[dict[str, Any] | None]
    strict: NotRequired[bool | None]


@forwarded
class FunctionChoice(TypedDict):
    """The model must call this function."""

    type: Literal["function"]
    name: str


def _choice_kind(choice: Any) -> str | None:
    if isinstance(choice, str):
        return "mode"
    return "function" if isinstance(choice, dict) else None


_ToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], Tag("mode")] | Annotated[FunctionChoice, Tag("function")],
    Discriminator(
        _choice_kind,
        custom_error_type="tool_choice",
        custom_error_message='Input should be "auto", "none", "required" or a function choice',
    ),
    untagged(0),
]


@forwarded
class TextFormat(TypedDict):
    """Plain text output."""

    type: Literal["text"]


@forwarded
class JsonObjectFormat(TypedDict):
    """Any JSON object."""

    type: Literal["json_object"]


@forwarded
class JsonSchemaFormat(TypedDict):
    """JSON matching a schema."""

    type: Literal["json_schema"]
    name: str
    schema: dict[str, Any]
    description: NotRequired[str | None]
    strict: NotRequired[bool | None]


@forwarded
class TextConfig(TypedDict):
    """`text`: the output format (`verbosity` is passed on)."""

    format: NotRequired[
        Annotated[
            Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")],
            untagged(0),
        ]
        | None
    ]
    verbosity: NotRequired[str | None]


def _stored(kind: dict[str, Any], why: str) -> WithJsonSchema:
    # The model reads the value as the API types it, so that `ResponsesFormat.check` can say
    # why it is refused (pydantic would only say "Input should be None"); the OpenAPI document
    # allows only what is served.
    return WithJsonSchema({**kind, "description": why})


_NOT_STORED = "Triage stores nothing: only null (or omitted) is served."
_NO_STORE = "Triage stores nothing: only false or null (or omitted) is served."
_NOT_POLLED = "Triage keeps nothing to poll: only false or null (or omitted) is served."
_NO_PROMPTS = "Stored prompt templates are not supported: only null (or omitted) is served."
_NULL = {"type": "null"}
_FALSE = {"anyOf": [{"type": "boolean", "const": False}, {"type": "null"}]}


class ResponsesRequest(OpenAIBaseModel):
    """POST /v1/responses body: only the fields the gateway reads; the rest is forwarded."""

    # Ordered by https://platform.openai.com/docs/api-reference/responses/create
    background: Annotated[bool | None, _stored(_FALSE, _NOT_POLLED)] = None
    conversation: Annotated[str | dict[str, Any] | None, _stored(_NULL, _NOT_STORED)] = None
    input: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[_Item], Tag("list")],
        string_or("input items"),
        untagged(0, 2),
    ]
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    model: str = Field(min_length=1)
    previous_response_id: Annotated[str | None, _stored(_NULL, _NOT_STORED)] = None
    prompt: Annotated[Any, _stored(_NULL, _NO_PROMPTS)] = None
    store: Annotated[bool | None, _stored(_FALSE, _NO_STORE)] = None
    stream: bool | None = None
    text: TextConfig | None = None
    tool_choice: _ToolChoice | None = None
    tools: list[FunctionTool] | None = None


def _usage(usage: Any) -> Usage | None:
    return counted_usage(usage, "input_tokens", "output_tokens")


def _finish(response: Any, calls: bool) -> str:
    """Chat's finish reason for a Response object: length, tool_calls or stop."""
    if isinstance(response, dict) and response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if reason == "max_output_tokens":
            return "length"
        if reason == "content_filter":
            return "content_filter"
    return "tool_calls" if calls else "stop"


class ResponsesFormat(WireFormat):
    """`POST /v1/responses`."""

    name = "responses"
    path = "/v1/responses"
    summary = "Create a model response, OpenAI Responses API (routed)"
    upstream_path = "/responses"
    request_model = ResponsesRequest
    via_chat = _VIA_CHAT

    # --- requests -------------------------------------------------------------------------

    def check(self, payload: dict[str, Any]) -> None:
        if payload.get("previous_response_id") is not None:
            raise InvalidRequest(
                "Triage does not store responses, so `previous_response_id` cannot be used: "
                "send the whole conversation in `input`.",
                param="previous_response_id",
            )
        if payload.get("store") is True:
            raise InvalidRequest(
                "Triage does not store responses: send `store: false` or omit it.", param="store"
            )
        if payload.get("background") is True:
            raise InvalidRequest(
                "Background responses are not supported (Triage stores nothing to poll): "
                "omit `background` or stream the response.",
                param="background",
            )
        if payload.get("conversation") is not None:
            raise InvalidRequest(
                "Triage does not store conversations: send the whole conversation in `input`.",
                param="conversation",
            )
        if payload.get("prompt") is not None:
            raise InvalidRequest(
                "Stored prompt templates (`prompt`) are not supported; send `input`.", param="prompt"
            )

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        as_chat = _VIA_CHAT.request(payload)
        prompt = chat_prompt(as_chat)
        prompt.as_chat = as_chat
        budget = payload.get("max_output_tokens")
        prompt.budget = budget if isinstance(budget, int) and not isinstance(budget, bool) else 0
        return prompt

    # --- answers --------------------------------------------------------------------------

    def well_shaped(self, parsed: Any) -> bool:
        if not isinstance(parsed, dict):
            return False
        output = parsed.get("output")
        if not isinstance(output, list) or not all(isinstance(item, dict) for item in output):
            return False
        usage = parsed.get("usage")
        return usage is None or isinstance(usage, dict)

    def answer(self, parsed: Any) -> Answer:
        output = parsed.get("output") if isinstance(parsed, dict) else None
        texts: list[str] = []
        logprobs: list[float] = []
        calls: list[Any] = []
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message" and isinstance(item.get("content"), list):
                for part in item["content"]:
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        if isinstance(part.get("text"), str):
                            texts.append(part["text"])
                        if isinstance(part.get("logprobs"), list):
                            logprobs += logprob_values(part["logprobs"])
            elif item.get("type") == "function_call":
                calls.append({"function": {"name": item.get("name"), "arguments": item.get("arguments")}})
        return Answer("".join(texts), _finish(parsed, bool(calls)), calls, logprobs)

    def usage(self, parsed: Any) -> Usage | None:
        return _usage(parsed.get("usage")) if isinstance(parsed, dict) else None

    # --- streams --------------------------------------------------------------------------

    def decode_event(self, event: bytes) -> Any:
        obj = event_json(event)
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise Malformed
        # An upstream's mid-stream error in chat's shape (`{"error": {...}}`) is still an error event.
        if not isinstance(obj.get("type"), str) and not isinstance(obj.get("error"), dict):
            raise Malformed
        return obj

    def ends(self, obj: Any, done: bool) -> bool:
        # The final event carries the whole response; `[DONE]` is no part of this protocol.
        return isinstance(obj, dict) and obj.get("type") in _FINAL

    def stream_error(self, obj: Any) -> bool:
        if not isinstance(obj, dict):
            return False
        return obj.get("type") in ("error", "response.failed") or isinstance(obj.get("error"), dict)

    def event_usage(self, obj: Any, so_far: Usage | None) -> Usage | None:
        if isinstance(obj, dict) and obj.get("type") in _FINAL:
            response = obj.get("response")
            found = _usage(response.get("usage")) if isinstance(response, dict) else None
            if found is not None:
                return found
        return so_far

    def feed(self, answer: StreamAnswer, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "response.output_text.delta":
            answer.events += 1
            if isinstance(obj.get("delta"), str):
                answer.text.append(obj["delta"])
            if isinstance(obj.get("logprobs"), list):
                answer.logprobs += logprob_values(obj["logprobs"])
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                answer.tool_delta(obj.get("output_index"), item.get("name"), item.get("arguments"))
        elif kind == "response.function_call_arguments.delta":
            answer.events += 1
            answer.tool_delta(obj.get("output_index"), None, obj.get("delta"))
        elif kind in _FINAL:
            answer.finish_reason = _finish(obj.get("response"), bool(answer.tools))

    # --- errors on this wire --------------------------------------------------------------

    def error_event(self, message: str, type_: str) -> bytes:
        # The Responses API's own error event, plus chat's `error` object: the official SDK
        # raises `APIError` on a stream event whose data has a truthy `error`.
        body = {
            "type": "error",
            "code": type_,
            "message": message,
            "param": None,
            "sequence_number": 0,
            "error": {"message": message, "type": type_, "param": None, "code": None},
        }
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
