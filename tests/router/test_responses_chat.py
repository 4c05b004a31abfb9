"""The Responses API wire format and its translation to chat completions, on recorded payloads.

Requests are what the official `openai` SDK sends (captured by a loopback server);
translated answers and streams are checked with the SDK's own types and stream parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.accounting import Usage
from router.endpoints.base import Malformed, StreamAnswer
from router.endpoints.responses import ResponsesFormat, ResponsesRequest
from router.endpoints.responses_chat import ResponsesViaChat
from router.errors import InvalidRequest
from tests.loopback import serve
from tests.router.test_responses_api import TWO_DELTA_EVENTS, WEATHER_TOOL

FMT = ResponsesFormat()
VIA = ResponsesViaChat()
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

IMAGE = "data:image/png;base64,iVBORw0KGgo="
CHAT_TEXT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_750_000_000,
    "model": "qwen2.5-7b-instruct",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
    },
}


# --- a loopback server the official SDK talks to ----------------------------------------


@dataclass
class Capture:
    """What the SDK sent, and what the server answers next."""

    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    reply: Callable[[dict[str, Any]], Response] = lambda body: JSONResponse({})

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="any", max_retries=0)


@pytest.fixture(scope="module")
def capture() -> Iterator[Capture]:
    state = Capture("")

    async def responses(request: Request) -> Response:
        body = await request.json()
        state.bodies.append(body)
        return state.reply(body)

    with serve(Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])])) as url:
        state.url = url
        yield state


def _answer_with(chat: dict[str, Any]) -> Callable[[dict[str, Any]], Response]:
    """Reply as Triage does for a chat-only upstream that answered `chat`."""
    return lambda body: JSONResponse(VIA.response(chat, body, body["model"]))


def _stream_with(data: bytes) -> Callable[[dict[str, Any]], Response]:
    return lambda body: Response(data, media_type="text/event-stream")


def _chat(
    text: str | None = None, calls: list[dict[str, Any]] | None = None, finish: str = "stop"
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return {**CHAT_TEXT, "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def _documented(body: dict[str, Any]) -> bool:
    """Whether the request schema the OpenAPI document publishes admits `body`."""
    jsonschema = pytest.importorskip("jsonschema")  # installed with schemathesis (the test extra)
    return bool(jsonschema.Draft202012Validator(ResponsesRequest.model_json_schema()).is_valid(body))


def _sent(capture: Capture) -> dict[str, Any]:
    """The SDK's last request: valid for the request model and for the schema the gateway publishes."""
    body = capture.bodies[-1]
    ResponsesRequest.model_validate(body)
    assert _documented(body)
    return body


# --- requests: what the SDK sends, translated ---------------------------------------------


def test_string_input(capture: Capture) -> None:
    capture.reply = _answer_with(CHAT_TEXT)
    with capture.client() as client:
        got = client.responses.create(model="auto", input="Say hi")
    sent = _sent(capture)
    assert sent == {"model": "auto", "input": "Say hi"}
    ResponsesRequest.model_validate(sent)
    FMT.check(sent)
    assert VIA.request(sent) == {"messages": [{"role": "user", "content": "Say hi"}]}
    # ... and the translated answer as the SDK reads it.
    assert got.output_text == "Hello there."
    assert got.model == "qwen2.5-7b-instruct"
    assert got.status == "completed"
    assert got.usage is not None
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (12, 3, 15)
    assert got.usage.input_tokens_details.cached_tokens == 4


def test_list_input_with_image_and_tool_round_trip(capture: Capture) -> None:
    capture.reply = _answer_with(_chat("It is 18C and sunny in Paris."))
    with capture.client() as client:
        got = client.responses.create(
            model="auto",
            instructions="Be brief.",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is in this image, and the weather in Paris?"},
                        {"type": "input_image", "image_url": IMAGE, "detail": "low"},
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"},
            ],
            tools=[WEATHER_TOOL],
            max_output_tokens=64,
            temperature=0.2,
        )
    sent = _sent(capture)
    ResponsesRequest.model_validate(sent)
    FMT.check(sent)
    assert VIA.request(sent) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image, and the weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parameters": WEATHER_TOOL["parameters"],
                    "strict": True,
                },
            }
        ],
    }
    assert got.output_text == "It is 18C and sunny in Paris."
    assert got.instructions == "Be brief."
    assert got.max_output_tokens == 64
    assert got.temperature == 0.2
    assert [t.type for t in got.tools] == ["function"]


class City(BaseModel):
    city: str


def test_json_schema_format(capture: Capture) -> None:
    capture.reply = _answer_with(_chat('{"city": "Paris"}'))
    with capture.client() as client:
        got = client.responses.parse(model="auto", input="Which city?", text_format=City)
    sent = _sent(capture)
    assert VIA.request(sent) == {
        "messages": [{"role": "user", "content": "Which city?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "City",
                "schema": {
                    "properties": {"city": {"title": "City", "type": "string"}},
                    "required": ["city"],
                    "title": "City",
                    "type": "object",
                    "additionalProperties": False,
                },
                "strict": True,
            },
        },
    }
    assert got.output_parsed == City(city="Paris")
    prompt = FMT.prompt(sent)
    assert prompt.json_wanted and "json_schema" in prompt.needs
    assert prompt.json_schema == sent["text"]["format"]["schema"]


def test_other_text_formats_and_settings() -> None:
    base = {"model": "auto", "input": "x"}
    assert "response_format" not in VIA.request({**base, "text": {"format": {"type": "text"}}})
    assert VIA.request({**base, "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"
    }
    chat = VIA.request(
        {
            **base,
            "stream": True,
            "tool_choice": {"type": "function", "name": "get_weather"},
            "tools": [WEATHER_TOOL],
            "reasoning": {"effort": "low", "summary": "auto"},
            "parallel_tool_calls": False,
            "top_p": 0.9,
            "user": "u-1",
            "top_k": 20,  # a vLLM sampling extra: forwarded as for chat
            "metadata": {"team": "a"},
            "include": ["message.output_text.logprobs"],
            "truncation": "disabled",
            "service_tier": "auto",
            "prompt_cache_key": "k",
            "safety_identifier": "s",
            "store": False,
            "top_logprobs": 2,
            "stream_options": {"include_obfuscation": False},
        }
    )
    assert chat == {
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "tools": [{"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}],
        "reasoning_effort": "low",
        "parallel_tool_calls": False,
        "top_p": 0.9,
        "user": "u-1",
        "top_k": 20,
    }
    for choice in ("auto", "none", "required"):
        assert VIA.request({**base, "tool_choice": choice})["tool_choice"] == choice


def test_conversation_items() -> None:
    """Typed and untyped messages, developer turns, assistant output echoed back, parallel calls."""
    chat = VIA.request(
        {
            "model": "auto",
            "input": [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Rules."}],
                },
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                },
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "get_weather",
                    "arguments": '{"city":"Rome"}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "21C"}],
                },
            ],
        }
    )
    call = {"type": "function", "function": {"name": "get_weather"}}
    assert chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c1", **call, "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", **call, "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "21C"},
    ]


def test_prompt_reads_the_translated_request() -> None:
    payload = {
        "model": "auto",
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe"},
                    {"type": "input_image", "image_url": IMAGE},
                ],
            }
        ],
        "tools": [WEATHER_TOOL],
        "max_output_tokens": 300,
    }
    prompt = FMT.prompt(payload)
    assert prompt.text == "Describe\nBe brief."
    assert prompt.images == 1
    assert prompt.needs == frozenset({"vision", "tools"})
    assert prompt.budget == 300
    assert FMT.prompt({"model": "auto", "input": "hi"}).budget == 0


def test_request_model_is_strict() -> None:
    ResponsesRequest.model_validate({"model": "m", "input": "x", "reasoning": {"effort": "low"}})
    for bad in (
        {"model": "m"},
        {"model": "", "input": "x"},
        {"model": "m", "input": 5},
        {"model": "m", "input": "x", "stream": "yes"},
        {"model": "m", "input": "x", "max_output_tokens": 0},
        {"model": "m", "input": "x", "max_output_tokens": "12"},
        {"model": "m", "input": "x", "store": "false"},
    ):
        with pytest.raises(ValidationError):
            ResponsesRequest.model_validate(bad)


# --- what Triage refuses, and why -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"previous_response_id": "resp_123"},
            "previous_response_id",
            "send the whole conversation in `input`",
        ),
        ({"store": True}, "store", "send `store: false` or omit it"),
        ({"background": True}, "background", "Background responses are not supported"),
        ({"conversation": "conv_1"}, "conversation", "does not store conversations"),
        ({"conversation": {"id": "conv_1"}}, "conversation", "does not store conversations"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "Stored prompt templates (`prompt`) are not supported"),
    ],
)
def test_stateful_requests_refused(extra: dict[str, Any], param: str, words: str) -> None:
    body = {"model": "auto", "input": "x", **extra}
    # The published schema allows only null (or false) here ...
    assert not _documented(body)
    # ... while the model reads the value, so that the check can say why it is refused.
    ResponsesRequest.model_validate(body)
    with pytest.raises(InvalidRequest) as err:
        FMT.check(body)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert words in err.value.message
    assert orjson.loads(FMT.error_body(err.value))["error"]["type"] == "invalid_request_error"


def test_stateless_requests_pass_the_check() -> None:
    for body in (
        {"model": "auto", "input": "x"},
        {
            "model": "a",
            "input": "x",
            "store": False,
            "background": False,
            "previous_response_id": None,
            "conversation": None,
            "prompt": None,
        },
        {"model": "a", "input": "x", "store": None, "background": None},
    ):
        assert _documented(body)
        ResponsesRequest.model_validate(body)
        FMT.check(body)


def _item(**fields: Any) -> dict[str, Any]:
    return {"input": [fields]}


ITEM_KINDS = "role user, assistant, system or developer, or an item of type function_call"


# What chat completions cannot express: (body fields, where the validation error points, what
# it says, and the refusal of the translation itself, should such a payload ever reach it).
UNSERVED: list[tuple[dict[str, Any], tuple[int | str, ...], str, str, str]] = [
    (
        {"tools": [{"type": "web_search"}]},
        ("tools", 0, "type"),
        "'function'",
        "tools[0]",
        "only function tools",
    ),
    (
        {"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs"]}]},
        ("tools", 1, "type"),
        "'function'",
        "tools[1]",
        "'file_search'",
    ),
    (_item(type="item_reference", id="msg_1"), ("input", 0), ITEM_KINDS, "input", "'item_reference'"),
    (
        _item(type="computer_call_output", call_id="c"),
        ("input", 0),
        ITEM_KINDS,
        "input",
        "'computer_call_output'",
    ),
    (_item(role="tool", content="x"), ("input", 0), ITEM_KINDS, "input[0]", "role"),
    (
        _item(role="user", content=[{"type": "input_image", "file_id": "file-1", "detail": "auto"}]),
        ("input", 0, "content", 0, "image_url"),
        "Field required",
        "input[0].content[0]",
        "`file_id` is not supported",
    ),
    (
        _item(role="user", content=[{"type": "input_file", "file_id": "f"}]),
        ("input", 0, "content", 0),
        "Input tag 'input_file' found",
        "input[0].content[0]",
        "'input_file'",
    ),
    (
        _item(role="assistant", content=[{"type": "input_image", "image_url": IMAGE}]),
        ("input", 0, "content", 0),
        "expected tags: 'input_text', 'output_text', 'refusal'",
        "input[0].content[0]",
        "'input_image' is not supported in a assistant message",
    ),
    (
        _item(type="function_call", call_id="c", name=5, arguments="{}"),
        ("input", 0, "name"),
        "Input should be a valid string",
        "input[0]",
        "string",
    ),
    (
        _item(type="function_call_output", call_id="c", output=[{"type": "refusal", "refusal": "no"}]),
        ("input", 0, "output", 0),
        "Input tag 'refusal' found",
        "input[0].output[0]",
        "may only hold text",
    ),
    (
        {"tool_choice": {"type": "web_search"}},
        ("tool_choice", "type"),
        "Input should be 'function'",
        "tool_choice",
        "function",
    ),
    (
        {"text": {"format": {"type": "grammar"}}},
        ("text", "format"),
        "Input tag 'grammar' found",
        "text.format",
        "json_schema",
    ),
]


@pytest.mark.parametrize(("fields", "loc", "says", "param", "refusal"), UNSERVED)
def test_what_chat_cannot_express_is_outside_the_request_schema(
    fields: dict[str, Any], loc: tuple[int | str, ...], says: str, param: str, refusal: str
) -> None:
    body = {"model": "auto", "input": "x", **fields}
    # The published schema does not admit it, so no schema-valid request meets a refusal ...
    assert not _documented(body)
    # ... and validation refuses it, naming the field as the client wrote it (no union member tags).
    with pytest.raises(ValidationError) as invalid:
        ResponsesRequest.model_validate(body)
    first = invalid.value.errors(include_url=False)[0]
    assert first["loc"] == loc
    assert says in first["msg"]
    # The translation still refuses such a payload rather than losing part of it.
    with pytest.raises(InvalidRequest) as err:
        VIA.request(body)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert refusal in err.value.message


def test_stored_prompts_are_refused_by_the_translation_too() -> None:
    with pytest.raises(InvalidRequest) as err:
        VIA.request({"model": "auto", "input": "x", "prompt": {"id": "pmpt_1"}})
    assert (err.value.param, err.value.status_code) == ("prompt", 400)


def test_input_without_a_chat_message_is_sent_on() -> None:
    """Reasoning items alone, or no items: valid, so the upstream decides, not the gateway."""
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": []}
    for body, messages in (
        ({"model": "auto", "input": []}, []),
        ({"model": "auto", "input": [reasoning]}, []),
        (
            {"model": "auto", "instructions": "Be brief.", "input": [reasoning]},
            [{"role": "system", "content": "Be brief."}],
        ),
    ):
        assert _documented(body)
        ResponsesRequest.model_validate(body)
        assert VIA.request(body) == {"messages": messages}
        assert FMT.prompt(body).chars == sum(len(m["content"]) for m in messages)


def test_every_schema_valid_shape_is_translated() -> None:
    """Optional and null fields, every part and item type: valid, so they are served."""
    body: dict[str, Any] = {
        "model": "auto",
        "max_output_tokens": 16,
        "input": [
            {"type": None, "role": "system", "content": [{"type": "input_text", "text": "Rules."}]},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": IMAGE, "detail": None, "file_id": None},
                    {"type": "output_text", "text": "quoted"},
                    {"type": "refusal", "refusal": "no"},
                ],
            },
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
            {"type": "reasoning"},
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "output_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
        ],
        "tools": [{"type": "function", "name": "f", "description": None, "parameters": None, "strict": None}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": None, "verbosity": "low"},
    }
    assert _documented(body)
    ResponsesRequest.model_validate(body)
    assert VIA.request(body) == {
        "messages": [
            {"role": "system", "content": "Rules."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": IMAGE}},
                    {"type": "text", "text": "quoted"},
                    {"type": "text", "text": "no"},
                ],
            },
            {"role": "assistant", "content": "I cannot."},
            {"role": "tool", "tool_call_id": "c", "content": "ab"},
        ],
        "max_tokens": 16,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "verbosity": "low",
    }


def test_input_must_be_a_string_or_items() -> None:
    for value, loc, says in (
        (5, ("input",), "Input should be a string or a list of input items"),
        ({"role": "user", "content": "x"}, ("input",), "Input should be a string or a list of input items"),
        ([{"role": "user", "content": 5}], ("input", 0, "content"), "a string or a list of content parts"),
        ([{"type": 5}], ("input", 0), ITEM_KINDS),
        ([{"type": {}}], ("input", 0), ITEM_KINDS),
        (["x"], ("input", 0), ITEM_KINDS),
    ):
        body: dict[str, Any] = {"model": "auto", "input": value}
        assert not _documented(body)
        with pytest.raises(ValidationError) as invalid:
            ResponsesRequest.model_validate(body)
        errors = invalid.value.errors(include_url=False)
        assert len(errors) == 1 and errors[0]["loc"] == loc and says in errors[0]["msg"]


# --- answers: chat completions back into Response objects -----------------------------


def _valid(body: dict[str, Any]) -> SDKResponse:
    return SDKResponse.model_validate(body, strict=True)


def test_text_answer_is_a_valid_response() -> None:
    payload = {"model": "auto", "input": "hi", "metadata": {"team": "a"}}
    body = VIA.response(CHAT_TEXT, payload, "student-small")
    got = _valid(body)
    assert body["id"].startswith("resp_") and body["output"][0]["id"].startswith("msg_")
    assert got.created_at == 1_750_000_000
    assert got.status == "completed" and got.incomplete_details is None
    assert got.output_text == "Hello there."
    assert got.metadata == {"team": "a"}
    assert body["store"] is False and got.previous_response_id is None and got.error is None
    # The model an upstream names; the model argument when it names none.
    assert got.model == "qwen2.5-7b-instruct"
    assert _valid(VIA.response({**CHAT_TEXT, "model": 7}, payload, "student-small")).model == "student-small"


def test_tool_call_answer() -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
        },
    ]
    payload = {"model": "auto", "input": "x", "tools": [WEATHER_TOOL], "tool_choice": "required"}
    got = _valid(VIA.response(_chat(None, calls, "tool_calls"), payload, "m"))
    assert [item.type for item in got.output] == ["function_call", "function_call"]
    first = got.output[0]
    assert first.type == "function_call"
    assert (first.call_id, first.name, first.arguments, first.status) == (
        "call_a",
        "get_weather",
        '{"city":"Paris"}',
        "completed",
    )
    assert first.id is not None and first.id.startswith("fc_")
    assert got.tool_choice == "required"
    assert got.output_text == ""
    # Text and a call: one message item, then the call.
    mixed = _valid(VIA.response(_chat("Let me check.", calls[:1], "tool_calls"), payload, "m"))
    assert [item.type for item in mixed.output] == ["message", "function_call"]


def test_length_answer_is_incomplete() -> None:
    got = _valid(VIA.response(_chat("Once upon a", finish="length"), {"model": "a", "input": "x"}, "m"))
    assert got.status == "incomplete"
    assert got.incomplete_details is not None and got.incomplete_details.reason == "max_output_tokens"
    assert got.output[0].type == "message" and got.output[0].status == "incomplete"


def test_answer_without_usage() -> None:
    chat = {k: v for k, v in CHAT_TEXT.items() if k != "usage"}
    assert _valid(VIA.response(chat, {"model": "a", "input": "x"}, "m")).usage is None


# --- streams: chat chunks into Responses events -----------------------------------------


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_750_000_000,
        "model": "qwen2.5-7b-instruct",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }


def _usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {**_chunk(), "choices": [], "usage": usage}


TEXT_CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo."}),
    _chunk(finish="stop"),
    _usage_chunk(12, 3),
]


def _tool_delta(
    index: int, id_: str | None = None, name: str | None = None, args: str = ""
) -> dict[str, Any]:
    fn: dict[str, Any] = {"arguments": args}
    if name is not None:
        fn["name"] = name
    call: dict[str, Any] = {"index": index, "function": fn}
    if id_ is not None:
        call.update(id=id_, type="function")
    return _chunk({"tool_calls": [call]})


TOOL_CHUNKS = [
    _chunk({"role": "assistant", "content": "Let me check."}),
    _tool_delta(0, "call_a", "get_weather"),
    _tool_delta(0, args='{"ci'),
    _tool_delta(0, args='ty": "Paris"}'),
    _tool_delta(1, "call_b", "get_weather", '{"city": '),
    _tool_delta(1, args='"Rome"}'),
    _chunk(finish="tool_calls"),
    _usage_chunk(40, 20),
]


def _translate(
    chunks: list[dict[str, Any]], usage: Usage | None, payload: dict[str, Any] | None = None
) -> bytes:
    stream = VIA.stream(payload or {"model": "auto", "input": "x", "stream": True}, "student-small")
    return b"".join(stream.event(c) for c in chunks) + stream.end(usage)


def _events(data: bytes) -> list[dict[str, Any]]:
    """Each SSE event's JSON, checked against its `event:` name and the SDK's event union."""
    assert data.endswith(b"\n\n")
    out = []
    for raw in data[:-2].split(b"\n\n"):
        name, payload = raw.split(b"\n")
        assert name.startswith(b"event: ") and payload.startswith(b"data: ")
        event = orjson.loads(payload[6:])
        assert event["type"] == name[7:].decode()
        EVENTS.validate_python(event, strict=True)
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_text_stream_events() -> None:
    events = _events(_translate(TEXT_CHUNKS, Usage(12, 3)))
    assert [e["type"] for e in events] == TWO_DELTA_EVENTS
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo."]
    final = _valid(events[-1]["response"])
    assert final.output_text == "Hello."
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (12, 3)
    assert final.model == "qwen2.5-7b-instruct" and final.created_at == 1_750_000_000
    assert {e["response"]["id"] for e in events if "response" in e} == {final.id}
    message_ids = {e["item_id"] for e in events if "item_id" in e} | {events[2]["item"]["id"]}
    assert message_ids == {final.output[0].id}


def test_nothing_is_sent_before_the_first_chunk() -> None:
    stream = VIA.stream({"model": "auto", "input": "x"}, "m")
    first = _events(stream.event(TEXT_CHUNKS[0]))
    # The role-only chunk carries no answer: only the response's opening events.
    assert [e["type"] for e in first] == ["response.created", "response.in_progress"]
    assert first[0]["response"]["status"] == "in_progress" and first[0]["response"]["output"] == []


def test_tool_call_stream_events() -> None:
    events = _events(_translate(TOOL_CHUNKS, None))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        # the message closes when the first call opens
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "message"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    assert added[1]["item"]["call_id"] == "call_a" and added[1]["item"]["name"] == "get_weather"
    final = _valid(events[-1]["response"])
    calls = [(o.call_id, o.arguments) for o in final.output if o.type == "function_call"]
    assert calls == [("call_a", '{"city": "Paris"}'), ("call_b", '{"city": "Rome"}')]
    # With no usage from the caller, the stream's own usage chunk is reported.
    assert final.usage is not None and final.usage.output_tokens == 20


def test_tool_name_after_arguments() -> None:
    """Arguments that arrive before the call's name wait for it (the item is announced with its name)."""
    chunks = [
        _tool_delta(0, "call_x", None, '{"a"'),
        _tool_delta(0, None, "f", ": 1}"),
        _chunk(finish="tool_calls"),
    ]
    events = _events(_translate(chunks, Usage(1, 1)))
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["name"] == "f" and added["item"]["call_id"] == "call_x"
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"a": 1}']


def test_length_stream_is_incomplete() -> None:
    events = _events(_translate([_chunk({"content": "Once upon a"}), _chunk(finish="length")], Usage(5, 3)))
    assert events[-1]["type"] == "response.incomplete"
    final = _valid(events[-1]["response"])
    assert final.status == "incomplete"
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "Once upon a"


def test_empty_stream_is_one_empty_message() -> None:
    events = _events(_translate([_chunk(finish="stop")], Usage(5, 0)))
    final = _valid(events[-1]["response"])
    assert [o.type for o in final.output] == ["message"] and final.output_text == ""


def test_sdk_reads_translated_streams(capture: Capture) -> None:
    client = capture.client()
    capture.reply = _stream_with(_translate(TEXT_CHUNKS, Usage(12, 3)))
    with client.responses.stream(model="auto", input="Say hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert capture.bodies[-1]["stream"] is True
    assert deltas == ["Hel", "lo."]
    assert final.output_text == "Hello."

    capture.reply = _stream_with(_translate(TOOL_CHUNKS, Usage(40, 20)))
    with client.responses.stream(model="auto", input="Weather?", tools=[WEATHER_TOOL]) as stream:
        args = [e.snapshot for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert args == ['{"ci', '{"city": "Paris"}', '{"city": ', '{"city": "Rome"}']
    assert final.output_text == "Let me check."
    assert [o.arguments for o in final.output if o.type == "function_call"] == [
        '{"city": "Paris"}',
        '{"city": "Rome"}',
    ]
    client.close()


def test_sdk_raises_on_an_error_event(capture: Capture) -> None:
    opened = VIA.stream({"model": "auto", "input": "x"}, "m")
    data = opened.event(TEXT_CHUNKS[1]) + FMT.error_event("upstream stream broke", "upstream_error")
    error = _events(FMT.error_event("upstream stream broke", "upstream_error"))[0]
    assert (error["type"], error["message"], error["code"]) == (
        "error",
        "upstream stream broke",
        "upstream_error",
    )
    capture.reply = _stream_with(data)
    seen = []
    with capture.client() as client, pytest.raises(openai.APIError) as err:
        for event in client.responses.create(model="auto", input="x", stream=True):
            seen.append(event.type)
    assert "upstream stream broke" in err.value.message
    assert "response.output_text.delta" in seen


# --- native parsing: an upstream that speaks the Responses API itself ---------------------

NATIVE_BODY = {
    "id": "resp_abc",
    "object": "response",
    "created_at": 1_750_000_000,
    "status": "completed",
    "model": "Qwen/Qwen3-8B",
    "output": [
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hmm"}],
        },
        {
            "id": "msg_1",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "Paris is ",
                    "annotations": [],
                    "logprobs": [{"token": "Paris", "logprob": -0.1, "bytes": [], "top_logprobs": []}],
                },
                {"type": "output_text", "text": "sunny.", "annotations": []},
            ],
        },
    ],
    "usage": {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 39,
    },
}


def test_native_answer() -> None:
    assert FMT.well_shaped(NATIVE_BODY)
    answer = FMT.answer(NATIVE_BODY)
    assert (answer.text, answer.finish_reason, answer.tool_calls, answer.logprobs) == (
        "Paris is sunny.",
        "stop",
        [],
        [-0.1],
    )
    assert FMT.usage(NATIVE_BODY) == Usage(30, 9)

    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "c",
        "name": "get_weather",
        "arguments": "{}",
        "status": "completed",
    }
    with_call = FMT.answer({**NATIVE_BODY, "output": [call]})
    assert with_call.finish_reason == "tool_calls"
    assert with_call.tool_calls == [{"function": {"name": "get_weather", "arguments": "{}"}}]

    cut = {**NATIVE_BODY, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assert FMT.answer(cut).finish_reason == "length"
    # The translated answers read back the same way.
    assert (
        FMT.answer(VIA.response(_chat("x", finish="length"), {"model": "a", "input": "x"}, "m")).finish_reason
        == "length"
    )
    assert FMT.well_shaped({**NATIVE_BODY, "usage": None})


HOSTILE: list[Any] = [
    None,
    True,
    5,
    "output",
    [],
    [{"output": []}],
    {},
    {"output": "text"},
    {"output": [1, "x"]},
    {"output": None, "usage": 5},
    {"output": [], "usage": []},
    {"output": [{"type": "message", "content": "plain"}]},
    {"output": [{"type": "message", "content": [None, {"type": "output_text", "text": 5, "logprobs": "x"}]}]},
    {
        "output": [
            {
                "type": "message",
                "content": [{"type": "output_text", "logprobs": [None, {"logprob": "x"}, {"logprob": True}]}],
            }
        ]
    },
    {"output": [{"type": "function_call", "name": ["x"], "arguments": {"a": 1}}]},
    {"status": "incomplete", "incomplete_details": "max_output_tokens", "output": []},
    {"status": ["incomplete"], "incomplete_details": {"reason": None}},
    {"usage": {"input_tokens": True, "output_tokens": 1}},
    {"usage": {"input_tokens": 2**60, "output_tokens": 1}},
    {"usage": {"input_tokens": 1.5, "output_tokens": 1}},
    {"usage": {"input_tokens": "1", "output_tokens": 1}},
    {"usage": {"input_tokens": 1, "output_tokens": None}},
]


@pytest.mark.parametrize("parsed", HOSTILE)
def test_native_answer_reads_any_json(parsed: Any) -> None:
    shaped = FMT.well_shaped(parsed)
    assert shaped is (
        isinstance(parsed, dict)
        and isinstance(parsed.get("output"), list)
        and all(isinstance(i, dict) for i in parsed["output"])
        and (parsed.get("usage") is None or isinstance(parsed.get("usage"), dict))
    )
    answer = FMT.answer(parsed)
    assert isinstance(answer.text, str) and all(isinstance(v, float) for v in answer.logprobs)
    assert FMT.usage(parsed) is None


def test_native_usage_clamps_negative_counts() -> None:
    assert FMT.usage({"usage": {"input_tokens": -3, "output_tokens": 2}}) == Usage(0, 2)
    assert FMT.usage({"usage": {"input_tokens": 3}}) == Usage(3, 0)


def _sse(obj: Any) -> bytes:
    return b"event: x\ndata: " + orjson.dumps(obj)


def test_decode_event() -> None:
    event = {"type": "response.output_text.delta", "delta": "hi", "sequence_number": 3}
    assert FMT.decode_event(_sse(event)) == event
    assert FMT.decode_event(b": keep-alive") is None
    assert FMT.decode_event(b"data: [DONE]") is None
    # A chat-shaped error from an upstream mid-stream is still an event.
    assert FMT.stream_error(FMT.decode_event(b'data: {"error": {"message": "boom"}}'))
    for bad in (
        b"data: {not json",
        b"data: [1, 2]",
        b'data: "response.completed"',
        b"data: null",
        b'data: {"delta": "no type"}',
        b'data: {"type": 5}',
        b'data: {"type": null, "error": "x"}',
        b"garbage line",
    ):
        with pytest.raises(Malformed):
            FMT.decode_event(bad)


def test_native_stream_round_trip() -> None:
    """Events translated from chat chunks, read back by the native parser: the same answer."""
    for chunks, text, finish, calls, usage in (
        (TEXT_CHUNKS, "Hello.", "stop", {}, Usage(12, 3)),
        (
            TOOL_CHUNKS,
            "Let me check.",
            "tool_calls",
            {1: '{"city": "Paris"}', 2: '{"city": "Rome"}'},
            Usage(40, 20),
        ),
        ([_chunk({"content": "Once"}), _chunk(finish="length")], "Once", "length", {}, Usage(5, 1)),
    ):
        answer = StreamAnswer()
        so_far: Usage | None = None
        ended = []
        for raw in _translate(chunks, usage)[:-2].split(b"\n\n"):
            obj = FMT.decode_event(raw)
            assert not FMT.stream_error(obj)
            FMT.feed(answer, obj)
            so_far = FMT.event_usage(obj, so_far)
            ended.append(FMT.ends(obj, False))
        assert ended[-1] and not any(ended[:-1])
        assert "".join(answer.text) == text
        assert answer.finish_reason == finish
        assert {i: t["arguments"] for i, t in answer.tools.items()} == calls
        assert all(t["name"] == "get_weather" for t in answer.tools.values())
        assert so_far == usage
        deltas = sum(1 for raw in _translate(chunks, usage).split(b"\n\n") if b".delta\n" in raw)
        assert answer.events == deltas
        assert answer.answer(True).tool_calls == [{"function": t} for t in answer.tools.values()]


def test_stream_errors_and_ends() -> None:
    assert FMT.stream_error({"type": "error", "code": "server_error", "message": "x", "sequence_number": 4})
    assert FMT.stream_error({"type": "response.failed", "response": {"status": "failed"}})
    assert FMT.stream_error(orjson.loads(FMT.error_event("m", "upstream_error").split(b"data: ")[1]))
    assert not FMT.stream_error({"type": "response.completed", "response": {"error": None}})
    assert not FMT.stream_error({"type": "response.output_text.delta", "error": None})
    assert FMT.ends({"type": "response.completed"}, False)
    assert FMT.ends({"type": "response.incomplete"}, False)
    assert not FMT.ends({"type": "response.output_text.done"}, True)
    assert not FMT.ends(None, True)


HOSTILE_EVENTS: list[Any] = [
    None,
    [],
    "x",
    {"type": "response.output_text.delta", "delta": 5, "logprobs": {"a": 1}},
    {"type": "response.output_text.delta", "delta": None, "logprobs": [5, {"logprob": "x"}]},
    {"type": "response.output_item.added", "item": "function_call", "output_index": "0"},
    {
        "type": "response.output_item.added",
        "item": {"type": "function_call", "name": 5, "arguments": []},
        "output_index": True,
    },
    {"type": "response.function_call_arguments.delta", "delta": {"a": 1}, "output_index": None},
    {"type": "response.completed", "response": "done"},
    {"type": "response.completed", "response": {"usage": {"input_tokens": "3", "output_tokens": 1}}},
    {"type": "response.incomplete", "response": {"status": "incomplete", "incomplete_details": ["x"]}},
    {"type": "response.incomplete", "response": {"usage": [1, 2]}},
    {"type": ["error"], "error": "text"},
]


@pytest.mark.parametrize("obj", HOSTILE_EVENTS)
def test_native_stream_reads_any_json(obj: Any) -> None:
    answer = StreamAnswer()
    FMT.feed(answer, obj)
    assert all(isinstance(t, str) for t in answer.text)
    assert all(isinstance(t["name"], str) and isinstance(t["arguments"], str) for t in answer.tools.values())
    assert FMT.event_usage(obj, Usage(1, 1)) == Usage(1, 1)
    assert isinstance(FMT.stream_error(obj), bool) and isinstance(FMT.ends(obj, True), bool)


def test_format_identity() -> None:
    assert (FMT.name, FMT.path, FMT.upstream_path) == ("responses", "/v1/responses", "/responses")
    assert FMT.request_model is ResponsesRequest and isinstance(FMT.via_chat, ResponsesViaChat)
    payload = {"model": "auto", "input": "x", "stream": True}
    assert FMT.upstream_payload(payload, "Qwen/Qwen3-8B", False) == {**payload, "model": "Qwen/Qwen3-8B"}
    assert FMT.wants_stream(payload) and not FMT.wants_stream({"input": "x"})
