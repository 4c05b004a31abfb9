"""Anthropic Messages: the wire format, its native parsing, and its translation to chat completions.

Requests are recorded from the official `anthropic` SDK against a loopback server, and
translated answers and streams are read back by that SDK (its types and its own stream
accumulation), so the translation is checked against the client it serves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import anthropic
import orjson
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.accounting import Usage
from router.endpoints.base import Malformed, StreamAnswer, StreamTranslator
from router.endpoints.messages import CountTokensRequest, MessagesFormat, MessagesRequest
from router.endpoints.messages_chat import MessagesViaChat
from router.errors import (
    AuthError,
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
    RateLimited,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from router.proxy import _parse as read_body
from tests.loopback import serve

FMT = MessagesFormat()
VIA = MessagesViaChat()
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": WEATHER_TOOL["input_schema"],
    },
}


# --- a loopback Messages server: records what the SDK sends, answers what the test set -----


@dataclass
class Recorder:
    """What the SDK sent, and the body or stream to answer it with."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    message: dict[str, Any] | None = None
    stream: bytes = b""


def _app(rec: Recorder) -> Starlette:
    async def messages(request: Request) -> Response:
        body = orjson.loads(await request.body())
        rec.requests.append(body)
        if body.get("stream"):
            return Response(rec.stream, media_type="text/event-stream")
        message = rec.message or VIA.response(_chat_answer("ok"), body, body["model"])
        return Response(orjson.dumps(message), media_type="application/json")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[anthropic.Anthropic, Recorder]]:
    rec = Recorder()
    with (
        serve(_app(rec)) as url,
        anthropic.Anthropic(base_url=url, api_key="sk-test", max_retries=0) as client,
    ):
        yield client, rec


def _documented(body: dict[str, Any], model: type[BaseModel] = MessagesRequest) -> bool:
    """Whether the request schema the OpenAPI document publishes admits `body`."""
    jsonschema = pytest.importorskip("jsonschema")  # installed with schemathesis (the test extra)
    return bool(jsonschema.Draft202012Validator(model.model_json_schema()).is_valid(body))


def _sent(server: tuple[anthropic.Anthropic, Recorder]) -> dict[str, Any]:
    """The SDK's last request: valid for the request model and for the schema the gateway publishes."""
    body = server[1].requests[-1]
    MessagesRequest.model_validate(body)
    assert _documented(body)
    return body


# --- requests: what the SDK sends, translated -----------------------------------------------


def test_system_string_sampling_and_stop_sequences(server: tuple[anthropic.Anthropic, Recorder]) -> None:
    client, _ = server
    client.messages.create(
        model="auto",
        max_tokens=256,
        system="You are terse.",
        messages=[{"role": "user", "content": "Name a prime."}],
        stop_sequences=["END", "\n\n"],
        metadata={"user_id": "u-1"},
        # This SDK no longer names the sampling fields; clients that still set them do it so.
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
    )
    sent = _sent(server)
    assert MessagesRequest.model_validate(sent).max_tokens == 256
    assert VIA.request(sent) == {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
        ],
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END", "\n\n"],
    }


def test_system_blocks_and_images(server: tuple[anthropic.Anthropic, Recorder]) -> None:
    client, _ = server
    client.messages.create(
        model="auto",
        max_tokens=64,
        system=[
            {"type": "text", "text": "You describe images.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "One sentence."},
        ],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "What are these?"},
                ],
            }
        ],
    )
    assert VIA.request(_sent(server)) == {
        "messages": [
            {"role": "system", "content": "You describe images.\nOne sentence."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "What are these?"},
                ],
            },
        ],
        "max_tokens": 64,
    }
    prompt = FMT.prompt(_sent(server))
    assert prompt.images == 2
    assert prompt.needs == {"vision"}
    assert prompt.budget == 64
    assert prompt.text.startswith("What are these?")


def test_tool_use_round_trip(server: tuple[anthropic.Anthropic, Recorder]) -> None:
    client, _ = server
    client.messages.create(
        model="auto",
        max_tokens=512,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=cast(
            Any,
            [
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Two cities.", "signature": "c2ln"},
                        {"type": "text", "text": "Checking both."},
                        {
                            "type": "tool_use",
                            "id": "toolu_01",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_02",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18°C, sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_02",
                            "content": [
                                {"type": "text", "text": "city"},
                                {"type": "text", "text": "not found"},
                            ],
                            "is_error": True,
                        },
                        {"type": "text", "text": "Summarise."},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t3", "name": "get_weather", "input": {}}],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t3"}]},
            ],
        ),
    )
    assert VIA.request(_sent(server)) == {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18°C, sunny"},
            {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: city\nnot found"},
            {"role": "user", "content": [{"type": "text", "text": "Summarise."}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "t3", "content": ""},
        ],
        "max_tokens": 512,
        "tools": [WEATHER_FUNCTION],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    assert FMT.prompt(_sent(server)).needs == {"tools"}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice(
    server: tuple[anthropic.Anthropic, Recorder], choice: dict[str, Any], expected: dict[str, Any]
) -> None:
    client, _ = server
    client.messages.create(
        model="m",
        max_tokens=8,
        tools=[WEATHER_TOOL],
        tool_choice=cast(Any, choice),
        messages=[{"role": "user", "content": "hi"}],
    )
    chat = VIA.request(_sent(server))
    assert {k: v for k, v in chat.items() if k in ("tool_choice", "parallel_tool_calls")} == expected


def test_stream_flag_is_kept_and_an_empty_system_dropped() -> None:
    payload = {
        "model": "m",
        "max_tokens": 8,
        "stream": True,
        "system": [],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert VIA.request(payload) == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": True,
    }


def _user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(blocks)}]}


def _assistant(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "assistant", "content": list(blocks)}]}


TOOL_USE = {"type": "tool_use", "id": "t", "name": "f", "input": {}}


# What chat completions cannot express: (body fields, where the validation error points, what
# it says, and the refusal of the translation itself, should such a payload ever reach it).
UNSERVED: list[tuple[dict[str, Any], tuple[int | str, ...], str, str, str]] = [
    (
        _user({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}),
        ("messages", 0, "content", 0),
        "Input tag 'document' found using 'type' does not match any of the expected tags: "
        "'text', 'image', 'tool_result'",
        "messages",
        "content blocks of type 'document' are not supported in user messages by this gateway",
    ),
    (
        _user(TOOL_USE),
        ("messages", 0, "content", 0),
        "Input tag 'tool_use' found",
        "messages",
        "content blocks of type 'tool_use' are not supported in user messages by this gateway",
    ),
    (
        _assistant({"type": "tool_result", "tool_use_id": "t", "content": "x"}),
        ("messages", 0, "content", 0),
        "expected tags: 'text', 'tool_use', 'thinking', 'redacted_thinking'",
        "messages",
        "content blocks of type 'tool_result' are not supported in assistant messages by this gateway",
    ),
    (
        _assistant({"type": "server_tool_use", "id": "s"}),
        ("messages", 0, "content", 0),
        "Input tag 'server_tool_use' found",
        "messages",
        "content blocks of type 'server_tool_use' are not supported in assistant messages by this gateway",
    ),
    (
        {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
        ("tools", 0, "type"),
        "Input should be 'custom'",
        "tools",
        "only custom tools (name, description, input_schema) are supported, not 'web_search_20250305'",
    ),
    (
        {"tools": [{"name": "f"}]},
        ("tools", 0, "input_schema"),
        "Field required",
        "tools",
        "a tool needs a string `name` and an object `input_schema`",
    ),
    (
        _user({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}),
        ("messages", 0, "content", 0, "content", 0, "type"),
        "Input should be 'text'",
        "messages",
        "tool_result content blocks of type 'image' are not supported by this gateway",
    ),
    (
        _user({"type": "image", "source": {"type": "file", "file_id": "f"}}),
        ("messages", 0, "content", 0, "source"),
        "Input tag 'file' found using 'type' does not match any of the expected tags: 'base64', 'url'",
        "messages",
        "an image block needs a `source` of type base64 (media_type, data) or url (url)",
    ),
    (
        _user({"type": "image", "source": {"type": "base64", "data": PNG}}),
        ("messages", 0, "content", 0, "source", "media_type"),
        "Field required",
        "messages",
        "an image block needs a `source` of type base64 (media_type, data) or url (url)",
    ),
    (
        _user({"type": "text", "text": 3}),
        ("messages", 0, "content", 0, "text"),
        "Input should be a valid string",
        "messages",
        "a text block needs a string `text`",
    ),
    (
        _assistant({**TOOL_USE, "input": []}),
        ("messages", 0, "content", 0, "input"),
        "Input should be a valid dictionary",
        "messages",
        "a tool_use block needs a string `id` and `name` and an object `input`",
    ),
    (
        _user({"type": "tool_result", "content": "x"}),
        ("messages", 0, "content", 0, "tool_use_id"),
        "Field required",
        "messages",
        "a tool_result block needs a string `tool_use_id`",
    ),
    (
        {"system": [{"type": "image", "source": {}}]},
        ("system", 0, "type"),
        "Input should be 'text'",
        "system",
        "system blocks must be text blocks, not 'image'",
    ),
    (
        {"tool_choice": {"type": "tool"}},
        ("tool_choice", "name"),
        "Field required",
        "tool_choice",
        "`tool_choice` must be auto, any, none, or tool with a `name`",
    ),
]


@pytest.mark.parametrize(("fields", "loc", "says", "param", "refusal"), UNSERVED)
def test_what_chat_cannot_express_is_outside_the_request_schema(
    fields: dict[str, Any], loc: tuple[int | str, ...], says: str, param: str, refusal: str
) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **fields}
    # The published schema does not admit it, so no schema-valid request meets a refusal ...
    assert not _documented(body)
    # ... and validation refuses it, naming the field as the client wrote it (no union member tags).
    with pytest.raises(ValidationError) as invalid:
        MessagesRequest.model_validate(body)
    first = invalid.value.errors(include_url=False)[0]
    assert first["loc"] == loc
    assert says in first["msg"]
    # The translation still refuses such a payload rather than losing part of it.
    with pytest.raises(InvalidRequest) as caught:
        FMT.prompt(body)
    assert (caught.value.message, caught.value.param, caught.value.status_code) == (refusal, param, 400)
    error = orjson.loads(FMT.error_body(caught.value))
    assert error == {"type": "error", "error": {"type": "invalid_request_error", "message": refusal}}


def test_messages_must_be_a_string_or_blocks() -> None:
    for content in (5, {"type": "text", "text": "x"}, None):
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
        assert not _documented(body)
        with pytest.raises(ValidationError) as invalid:
            MessagesRequest.model_validate(body)
        assert [(e["loc"], e["msg"]) for e in invalid.value.errors(include_url=False)] == [
            (("messages", 0, "content"), "Input should be a string or a list of content blocks")
        ]


def test_every_schema_valid_shape_is_translated() -> None:
    """Optional and null fields, whole-number floats, thinking blocks: valid, so they are served."""
    body: dict[str, Any] = {
        "model": "m",
        "max_tokens": 8,
        "top_k": 40.0,  # JSON has one number type: a whole float is an integer
        "temperature": 1,
        "system": None,
        "tool_choice": {"type": "none", "disable_parallel_tool_use": True},
        "tools": [{"type": "custom", "name": "f", "input_schema": {"type": "object"}, "description": None}],
        "messages": [
            {"role": "user", "content": "Run f."},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Call f.", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    TOOL_USE,
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": None, "is_error": None},
                    {"type": "tool_result", "tool_use_id": "t2", "content": [], "is_error": True},
                ],
            },
            {"role": "user", "content": []},
        ],
    }
    assert _documented(body)
    MessagesRequest.model_validate(body)
    chat = VIA.request(body)
    assert chat["messages"] == [
        {"role": "user", "content": "Run f."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t", "content": ""},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: "},
        {"role": "user", "content": []},
    ]
    assert chat["tool_choice"] == "none" and "parallel_tool_calls" not in chat
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    # A native upstream gets the integer the request meant (the gateway reads whole numbers as such).
    sent = FMT.upstream_payload(read_body(orjson.dumps(body), FMT, 100_000), "claude", False)
    assert sent["top_k"] == 40 and type(sent["top_k"]) is int
    assert body["top_k"] == 40.0
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate({**body, "top_k": 40.5})


def test_request_models() -> None:
    good = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "vendor_x": 1}
    assert MessagesRequest.model_validate(good).model_extra == {"vendor_x": 1}
    for bad in (
        {k: v for k, v in good.items() if k != "max_tokens"},
        {**good, "max_tokens": "8"},
        {**good, "messages": []},
        {**good, "messages": [{"role": "system", "content": "x"}]},
        {**good, "stream": "yes"},
        {**good, "top_k": "40"},
    ):
        assert not _documented(bad)
        with pytest.raises(ValidationError):
            MessagesRequest.model_validate(bad)
    count = {k: v for k, v in good.items() if k != "max_tokens"}
    CountTokensRequest.model_validate(count)
    assert _documented(count, CountTokensRequest)


# --- count_tokens ---------------------------------------------------------------------------


IMAGE_TOKENS = 1000


def _count(payload: dict[str, Any], chars_per_token: float) -> int:
    """What /v1/messages/count_tokens answers: the routing estimate of the request's prompt."""
    prompt = FMT.prompt(payload)
    return math.ceil(prompt.chars / chars_per_token) + prompt.images * IMAGE_TOKENS


def test_count_tokens_counts_text_tools_and_images_not_their_bytes() -> None:
    text_only = {"model": "m", "system": "s" * 40, "messages": [{"role": "user", "content": "u" * 60}]}
    assert _count(text_only, 4.0) == 25
    assert _count(text_only, 3.0) == 34  # ceil(100 / 3)

    with_tools = {**text_only, "tools": [WEATHER_TOOL]}
    schema_chars = len(orjson.dumps([WEATHER_FUNCTION]))
    assert _count(with_tools, 4.0) == math.ceil((100 + schema_chars) / 4)

    big = "A" * 200_000  # a 200 KB base64 image is one image, not 50k tokens of text
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": big}}
    with_image = {
        **text_only,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "u" * 60}]}],
    }
    assert _count(with_image, 4.0) == 25 + IMAGE_TOKENS


# --- answers: chat completion → Message -----------------------------------------------------


def _chat_answer(
    text: str | None,
    finish: str = "stop",
    calls: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    **choice: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls is not None:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "qwen-small",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None, **choice}],
        "usage": usage or {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26},
    }


ASK = {"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def test_response_text() -> None:
    message = Message.model_validate(VIA.response(_chat_answer("Hello there."), ASK, "fallback"))
    assert message.id.startswith("msg_")
    assert message.model == "qwen-small"
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "Hello there."}
    ]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.usage.input_tokens == 21
    assert message.usage.output_tokens == 5
    assert message.usage.cache_read_input_tokens == 0


def test_response_tool_calls() -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Os'}},  # cut short
    ]
    raw = VIA.response(_chat_answer("Let me check.", "tool_calls", calls), ASK, "fallback")
    message = Message.model_validate(raw)
    assert message.stop_reason == "tool_use"
    text, first, second = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert first.type == "tool_use" and (first.id, first.name, first.input) == (
        "call_a",
        "get_weather",
        {"city": "Paris"},
    )
    # Arguments that are not a JSON object become {}: a Message's tool input must be one.
    assert second.type == "tool_use" and second.id.startswith("toolu_") and second.input == {}
    assert FMT.answer(raw).tool_calls[0] == {
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    }


@pytest.mark.parametrize(
    ("finish", "calls", "reason"),
    [
        ("length", None, "max_tokens"),
        ("content_filter", None, "refusal"),
        ("weird", None, "end_turn"),
        # Some servers end a tool call with `stop`; Anthropic clients run tools only on `tool_use`.
        ("stop", [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "tool_use"),
    ],
)
def test_response_stop_reasons(finish: str, calls: list[dict[str, Any]] | None, reason: str) -> None:
    message = Message.model_validate(VIA.response(_chat_answer("x", finish, calls), ASK, "m"))
    assert message.stop_reason == reason


def test_response_stop_sequence_and_cached_tokens() -> None:
    payload = {**ASK, "stop_sequences": ["END"]}
    usage = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}}
    chat = _chat_answer("done", usage=usage, stop_reason="END")  # vLLM names the matched stop string
    raw = VIA.response(chat, payload, "m")
    message = Message.model_validate(raw)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (36, 64)
    assert FMT.usage(raw) == Usage(100, 3)  # read natively, the three add up to the prompt again


def test_response_of_a_chat_answer_with_wrong_types_is_still_a_message() -> None:
    for chat in (
        {},
        {"choices": "x", "usage": [], "model": 3},
        {"choices": [{"message": {"content": 5, "tool_calls": [1, {"function": "f"}]}, "finish_reason": 2}]},
        {"choices": [None], "usage": {"prompt_tokens": True, "completion_tokens": -4}},
    ):
        message = Message.model_validate(VIA.response(chat, ASK, "fallback"))
        assert message.model == "fallback"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (0, 0)


def test_sdk_reads_the_translated_message(server: tuple[anthropic.Anthropic, Recorder]) -> None:
    client, rec = server
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
        }
    ]
    rec.message = VIA.response(_chat_answer(None, "tool_calls", calls), ASK, "m")
    try:
        message = client.messages.create(
            model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        rec.message = None
    block = message.content[0]
    assert block.type == "tool_use" and block.input == {"city": "Rome"}
    assert message.stop_reason == "tool_use"


# --- streams: chat chunks → Messages events -------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "qwen-small",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "qwen-small",
        "choices": [],
        "usage": usage,
    }


def _call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


TEXT_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo!"}),
    _chunk({}, "stop"),
    _usage_chunk(11, 3),
]
TOOL_STREAM = [
    _chunk({"role": "assistant", "content": "Checking."}),
    _chunk(_call(0, "", "call_p", "get_weather")),
    _chunk(_call(0, '{"ci')),
    _chunk(_call(0, 'ty": "Paris"}')),
    _chunk(_call(1, '{"city": "Oslo"}', "call_o", "get_weather")),
    _chunk({}, "tool_calls"),
    _usage_chunk(40, 22),
]
LENGTH_STREAM = [_chunk({"role": "assistant", "content": "A long"}), _chunk({"content": " story"}, "length")]


def _translate(chunks: list[dict[str, Any]], payload: dict[str, Any] = ASK) -> bytes:
    translator: StreamTranslator = VIA.stream(payload, "fallback")
    usage = None
    out = b""
    for chunk in chunks:
        out += translator.event(chunk)
        if chunk.get("usage"):
            usage = Usage(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
    return out + translator.end(usage)


def _events(body: bytes) -> list[dict[str, Any]]:
    """Each event parsed, checked for SSE framing and against the SDK's event types."""
    events = []
    for raw in body.split(b"\n\n")[:-1]:
        name, data = raw.split(b"\n")
        obj = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + obj["type"].encode()
        EVENTS.validate_python(obj)
        events.append(obj)
    assert body.endswith(b"\n\n")
    return events


def test_text_stream_events() -> None:
    events = _events(_translate(TEXT_STREAM))
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["model"] == "qwen-small"
    assert events[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert events[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[5] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 11, "output_tokens": 3},
    }


def test_tool_stream_blocks() -> None:
    events = _events(_translate(TOOL_STREAM))
    starts = [(e["index"], e["content_block"]) for e in events if e["type"] == "content_block_start"]
    assert starts == [
        (0, {"type": "text", "text": ""}),
        (1, {"type": "tool_use", "id": "call_p", "name": "get_weather", "input": {}}),
        (2, {"type": "tool_use", "id": "call_o", "name": "get_weather", "input": {}}),
    ]
    pieces = [
        e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert pieces == ['{"ci', 'ty": "Paris"}', '{"city": "Oslo"}']
    # Each block is closed before the next opens.
    order = [
        (e["type"], e.get("index"))
        for e in events
        if e["type"].startswith("content_block_") and "delta" not in e
    ]
    assert order == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_stop", 2),
    ]


def test_empty_stream_is_still_a_message() -> None:
    events = _events(_translate([]))
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1]["usage"] == {"output_tokens": 0}


@pytest.mark.parametrize(
    ("chunks", "text", "tools", "reason", "usage"),
    [
        (TEXT_STREAM, "Hello!", [], "end_turn", (11, 3)),
        (
            TOOL_STREAM,
            "Checking.",
            [("call_p", {"city": "Paris"}), ("call_o", {"city": "Oslo"})],
            "tool_use",
            (40, 22),
        ),
        (LENGTH_STREAM, "A long story", [], "max_tokens", (0, 0)),
    ],
)
def test_sdk_accumulates_the_translated_stream(
    server: tuple[anthropic.Anthropic, Recorder],
    chunks: list[dict[str, Any]],
    text: str,
    tools: list[tuple[str, dict[str, Any]]],
    reason: str,
    usage: tuple[int, int],
) -> None:
    client, rec = server
    rec.stream = _translate(chunks)
    with client.messages.stream(
        model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    assert "".join(b.text for b in message.content if b.type == "text") == text
    assert [(b.id, b.input) for b in message.content if b.type == "tool_use"] == tools
    assert message.stop_reason == reason
    assert (message.usage.input_tokens, message.usage.output_tokens) == usage


def test_native_reader_reads_the_translated_stream() -> None:
    """The translator's events, read as a native Messages upstream's stream, give the same answer."""
    answer = StreamAnswer()
    usage: Usage | None = None
    ended = False
    for raw in _translate(TOOL_STREAM).split(b"\n\n")[:-1]:
        obj = FMT.decode_event(raw + b"\n\n")
        assert not FMT.stream_error(obj) and FMT.carries_answer(obj)
        FMT.feed(answer, obj)
        usage = FMT.event_usage(obj, usage)
        ended = FMT.ends(obj, False)
    assert ended
    result = answer.answer(True)
    assert (result.text, result.finish_reason) == ("Checking.", "tool_calls")
    assert result.tool_calls == [
        {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
    ]
    assert usage == Usage(40, 22)
    assert answer.events == 4  # one text delta and three argument pieces


# --- native Messages upstreams: answers and streams as Anthropic's API sends them -----------

NATIVE_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "hm", "signature": "s"},
        {"type": "text", "text": "Let me "},
        {"type": "text", "text": "look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 90,
        "output_tokens": 7,
    },
}

NATIVE_STREAM = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","content":[],"model":"claude","stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":25,"cache_creation_input_tokens":5,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": "}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"\\"Rome\\"}"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use",'
    b'"stop_sequence":null},"usage":{"output_tokens":15}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def test_native_answer_and_usage() -> None:
    assert FMT.well_shaped(NATIVE_MESSAGE)
    Message.model_validate(NATIVE_MESSAGE)
    answer = FMT.answer(NATIVE_MESSAGE)
    assert (answer.text, answer.finish_reason) == ("Let me look.", "tool_calls")
    assert answer.tool_calls == [{"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert FMT.usage(NATIVE_MESSAGE) == Usage(100, 7)


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "refusal"), (None, None), (3, None)],
)  # fmt: skip
def test_native_stop_reasons(stop: Any, finish: str | None) -> None:
    assert FMT.answer({**NATIVE_MESSAGE, "stop_reason": stop}).finish_reason == finish


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {**NATIVE_MESSAGE, "type": "chat.completion"},
        {**NATIVE_MESSAGE, "content": "text"},
        {**NATIVE_MESSAGE, "content": [1]},
        {**NATIVE_MESSAGE, "usage": 5},
    ],
)
def test_not_well_shaped(body: Any) -> None:
    assert not FMT.well_shaped(body)


def test_native_stream() -> None:
    answer = StreamAnswer()
    usage: Usage | None = None
    seen = []
    for raw in NATIVE_STREAM:
        obj = FMT.decode_event(raw)
        assert isinstance(obj, dict)
        FMT.feed(answer, obj)
        usage = FMT.event_usage(obj, usage)
        seen.append((obj["type"], usage, FMT.ends(obj, False)))
    assert seen[0] == ("message_start", Usage(30, 1), False)
    assert seen[1] == ("ping", Usage(30, 1), False)
    assert seen[-2] == ("message_delta", Usage(30, 15), False)
    assert seen[-1] == ("message_stop", Usage(30, 15), True)
    result = answer.answer(True)
    assert (result.text, result.finish_reason) == ("Hi", "tool_calls")
    assert result.tool_calls == [{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]
    assert answer.events == 3


def test_message_delta_input_tokens_replace_the_start() -> None:
    delta = {"type": "message_delta", "delta": {}, "usage": {"input_tokens": 50, "output_tokens": 9}}
    assert FMT.event_usage(delta, Usage(30, 1)) == Usage(50, 9)
    # Without any input count the usage stays unknown: the gateway estimates it instead.
    assert FMT.event_usage({"type": "message_delta", "usage": {"output_tokens": 9}}, None) is None


def test_stream_error_and_upstream_payload() -> None:
    error = FMT.decode_event(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    assert FMT.stream_error(error)
    assert not FMT.stream_error({"type": "message_stop"})
    assert FMT.decode_event(b": keep-alive\n\n") is None
    payload = {**ASK, "stream": True}
    assert FMT.upstream_payload(payload, "claude-haiku", True) == {**payload, "model": "claude-haiku"}
    assert payload["model"] == "auto"


@pytest.mark.parametrize(
    "event",
    [
        b"data: {not json\n\n",
        b"data: []\n\n",
        b'data: {"type": 5}\n\n',
        b'data: {"no": "type"}\n\n',
        b"garbage line\n\n",
    ],
)
def test_decode_event_refuses(event: bytes) -> None:
    with pytest.raises(Malformed):
        FMT.decode_event(event)


HOSTILE: list[Any] = [
    None,
    1,
    "x",
    [],
    {},
    {"type": 5},
    {"type": "message", "content": "x", "usage": "y"},
    {
        "type": "message",
        "content": [1, None, {"type": "text", "text": 5}, {"type": "tool_use", "name": 3, "input": 2**70}],
    },
    {"type": "message", "content": [{"type": "tool_use", "input": {"deep": [[[[]]]]}}], "stop_reason": []},
    {"usage": {"input_tokens": True, "output_tokens": 2**60}},
    {"usage": {"input_tokens": 2**60, "output_tokens": "1"}},
    {"usage": {"input_tokens": 5, "cache_read_input_tokens": "x", "output_tokens": -3}},
    {"type": "message_start", "message": []},
    {"type": "message_start", "message": {"usage": {"input_tokens": "3"}}},
    {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": None}}},
    {"type": "message_delta", "usage": {"output_tokens": -5, "input_tokens": 1.5}, "delta": "x"},
    {"type": "message_delta", "delta": {"stop_reason": {}}},
    {"type": "content_block_delta", "index": "a", "delta": {"type": "input_json_delta", "partial_json": 7}},
    {"type": "content_block_delta", "index": True, "delta": {"type": "text_delta", "text": None}},
    {"type": "content_block_delta", "delta": []},
    {"type": "content_block_start", "index": None, "content_block": {"type": "tool_use", "name": []}},
    {"type": "content_block_start", "content_block": 3},
    {"type": "error", "error": "x"},
]


def test_hostile_json_never_raises() -> None:
    answer = StreamAnswer()
    for obj in HOSTILE:
        FMT.well_shaped(obj)
        FMT.answer(obj)
        usage = FMT.usage(obj)
        assert usage is None or (usage.prompt_tokens >= 0 and usage.completion_tokens >= 0)
        FMT.event_usage(obj, None)
        FMT.event_usage(obj, Usage(1, 1))
        FMT.ends(obj, False)
        FMT.stream_error(obj)
        FMT.feed(answer, obj)
    answer.answer(True)
    assert FMT.usage({"usage": {"input_tokens": True, "output_tokens": 1}}) is None
    assert FMT.usage(
        {"usage": {"input_tokens": 5, "cache_read_input_tokens": "x", "output_tokens": 2}}
    ) == Usage(5, 2)
    # An input that cannot be serialised (past 64 bits) reads as no arguments rather than an error.
    bad = {"type": "message", "content": [{"type": "tool_use", "name": "f", "input": {"n": 2**70}}]}
    assert FMT.answer(bad).tool_calls == [{"function": {"name": "f", "arguments": ""}}]


def test_hostile_chunks_in_the_translator() -> None:
    translator = VIA.stream(ASK, "fallback")
    chunks: list[dict[str, Any]] = [
        {},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"delta": None}]},
        {"choices": [{"delta": {"content": 5, "tool_calls": "x"}}]},
        {"choices": [{"delta": {"tool_calls": [None, {"index": "a", "function": "f"}, {"id": 3}]}}]},
    ]
    for chunk in chunks:
        translator.event(chunk)
    events = _events(translator.event(_chunk({"content": "ok"})) + translator.end(None))
    assert events[-2]["delta"]["stop_reason"] == "tool_use"  # a tool block was opened


# --- errors in Anthropic's envelope ---------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "type_"),
    [
        (InvalidRequest("bad body"), "invalid_request_error"),
        (BodyTooLarge("too large"), "invalid_request_error"),
        (AuthError("no key"), "authentication_error"),
        (ModelNotAllowed("pinned"), "permission_error"),
        (ModelNotFound("no such model"), "not_found_error"),
        (RateLimited("slow down", "requests_per_minute", 1.0), "rate_limit_error"),
        (Overloaded("busy"), "overloaded_error"),
        (UpstreamTimeout("late"), "timeout_error"),
        (UpstreamUnavailable("down"), "api_error"),
        (GatewayError("oops"), "api_error"),
    ],
)
def test_error_body_types(exc: GatewayError, type_: str) -> None:
    body = orjson.loads(FMT.error_body(exc))
    assert body == {"type": "error", "error": {"type": type_, "message": exc.message}}
    ErrorResponse.model_validate(body)


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (402, "billing_error"), (413, "invalid_request_error"),
     (422, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
     (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error")],
)  # fmt: skip
def test_upstream_status_bodies(status: int, type_: str) -> None:
    native = (
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}'
    )
    assert FMT.error_body(UpstreamStatus(status, native)) == native

    openai = orjson.dumps({"error": {"message": "context too long", "type": "BadRequestError", "code": 400}})
    assert orjson.loads(FMT.error_body(UpstreamStatus(status, openai))) == {
        "type": "error",
        "error": {"type": type_, "message": "context too long"},
    }

    for other in (b"<html><body>502 Bad Gateway at 10.0.0.7</body></html>", b'{"error": "raw text"}', b""):
        body = FMT.error_body(UpstreamStatus(status, other))
        assert orjson.loads(body) == {
            "type": "error",
            "error": {"type": type_, "message": f"upstream model returned HTTP {status}"},
        }
        ErrorResponse.model_validate_json(body)


def test_error_event() -> None:
    for type_, expected in (
        ("upstream_error", "api_error"),
        ("upstream_timeout", "timeout_error"),
        ("overloaded", "overloaded_error"),
    ):
        raw = FMT.error_event("model failed", type_)
        assert raw.startswith(b"event: error\ndata: ") and raw.endswith(b"\n\n")
        obj = orjson.loads(raw.split(b"data: ", 1)[1])
        assert obj == {"type": "error", "error": {"type": expected, "message": "model failed"}}
        assert FMT.stream_error(FMT.decode_event(raw))
