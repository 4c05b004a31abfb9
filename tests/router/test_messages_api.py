"""End to end: Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on `triage serve`.

The gateway runs as a real process; the clients are the official `anthropic` SDK and
LangChain's `ChatAnthropic`. Students that speak only chat completions get the request
translated (the fakes in tests/fake_upstream.py see a chat-completions request); a
student that lists `messages` in its `api` gets the Messages body itself, from the native
fake below, which speaks Anthropic's JSON and event stream.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import orjson
import pytest
import yaml
from anthropic.types import Message, MessageParam, ToolParam
from langchain_anthropic import ChatAnthropic
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import GatewayFactory, Upstreams, base_config
from tests.loopback import serve, serving, triage_process

SMALL_TEXT = "small-0 small-1 small-2 small-3 small-4 "
TEACHER_TEXT = "teacher-0 teacher-1 teacher-2 teacher-3 teacher-4 "
REFUSAL = "I'm sorry, I can't help with that."
# What the fakes report: 11 prompt tokens, one completion token per word (5 by default).
PROMPT_TOKENS = 11
# base_config prices, USD per token.
SMALL_PRICE = (0.1e-6, 0.2e-6)
TEACHER_PRICE = (3.0e-6, 15.0e-6)
WEATHER_TOOL: ToolParam = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ASK: list[MessageParam] = [{"role": "user", "content": "hello"}]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def gateway_url(_upstream_servers: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `triage serve` on the three-model config for the module (metrics are read as deltas)."""
    with serving(base_config(_upstream_servers.urls), tmp_path_factory.mktemp("messages")) as url:
        yield url


Connect = Callable[..., anthropic.Anthropic]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open `anthropic.Anthropic` clients (base URL, key, other options); closed after the test."""
    opened: list[anthropic.Anthropic] = []

    def open_client(url: str, key: str | None = "any", **options: Any) -> anthropic.Anthropic:
        sdk = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, **options)
        opened.append(sdk)
        return sdk

    yield open_client
    for sdk in opened:
        sdk.close()


def scrape(url: str) -> Samples:
    """Every sample `/metrics` exposes, by name and labels."""
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(check: Callable[[], bool]) -> bool:
    """Whether `check` holds within a few seconds (a stream is accounted for after its last byte)."""
    deadline = time.monotonic() + 5
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def error_body(exc: anthropic.APIStatusError) -> Any:
    """The error's JSON body, as the SDK parsed it."""
    return exc.body


# --- messages.create and messages.stream, translated to chat completions -------------------------


def test_create_is_translated_to_chat_and_back(
    connect: Connect, gateway_url: str, upstreams: Upstreams
) -> None:
    raw = connect(gateway_url).messages.with_raw_response.create(
        model="auto", max_tokens=64, system="Be brief.", messages=ASK
    )
    message = raw.parse()
    assert raw.headers["x-triage-model"] == "student-small"
    assert raw.headers["x-triage-reason"] == "classifier"
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "up-small"  # the upstream's model id, passed on
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == SMALL_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_TOKENS
    assert message.usage.output_tokens == 5
    # The student only speaks chat completions: it was asked in that format.
    assert upstreams.small.requests == [
        {
            "model": "up-small",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
            "max_tokens": 64,
        }
    ]
    assert upstreams.teacher.requests == []


def test_stream_text_usage_and_event_order(connect: Connect, gateway_url: str, upstreams: Upstreams) -> None:
    sdk = connect(gateway_url)
    with sdk.messages.stream(model="auto", max_tokens=64, messages=ASK) as stream:
        assert stream.response.headers["x-triage-model"] == "student-small"
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == SMALL_TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == PROMPT_TOKENS and final.usage.output_tokens == 5
    sent = upstreams.small.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}

    events = list(sdk.messages.create(model="auto", max_tokens=64, messages=ASK, stream=True))
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_tool_use_round_trip(connect: Connect, gateway_url: str, upstreams: Upstreams) -> None:
    sdk = connect(gateway_url)
    upstreams.small.tool_calls = [WEATHER_CALL]
    question: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]

    message = sdk.messages.create(model="auto", max_tokens=64, tools=[WEATHER_TOOL], messages=question)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["tool_use"]
    block = message.content[0]
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("call_1", "get_weather", {"city": "Paris"})
    # The tool went upstream as a chat function tool.
    assert upstreams.small.requests[-1]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city.",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]

    with sdk.messages.stream(model="auto", max_tokens=64, tools=[WEATHER_TOOL], messages=question) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.type for b in streamed.content] == ["tool_use"]
    call = streamed.content[0]
    assert call.type == "tool_use"
    assert (call.id, call.name, call.input) == ("call_1", "get_weather", {"city": "Paris"})

    # The client runs the tool and sends its result back.
    upstreams.small.tool_calls = None
    upstreams.small.requests.clear()
    answer = sdk.messages.create(
        model="auto",
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=[
            *question,
            {"role": "assistant", "content": streamed.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18 C and sunny"}],
            },
        ],
    )
    assert answer.content[0].type == "text" and answer.content[0].text == SMALL_TEXT
    (sent,) = upstreams.small.requests
    user, assistant, tool = sent["messages"]
    assert user == {"role": "user", "content": "What is the weather in Paris?"}
    assert assistant["role"] == "assistant" and assistant["content"] is None
    (sent_call,) = assistant["tool_calls"]
    assert sent_call["id"] == "call_1" and sent_call["type"] == "function"
    assert sent_call["function"]["name"] == "get_weather"
    assert json.loads(sent_call["function"]["arguments"]) == {"city": "Paris"}
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}


# --- count_tokens ------------------------------------------------------------------------------


def test_count_tokens(connect: Connect, gateway_url: str, upstreams: Upstreams) -> None:
    sdk = connect(gateway_url)

    def count(messages: list[MessageParam], tools: list[ToolParam] | None = None) -> int:
        if tools is None:
            return sdk.messages.count_tokens(model="auto", messages=messages).input_tokens
        return sdk.messages.count_tokens(model="auto", messages=messages, tools=tools).input_tokens

    short = count([{"role": "user", "content": "hello there"}])
    long = count([{"role": "user", "content": "hello there " * 100}])
    assert 0 < short < long
    assert 250 <= long <= 400  # 1,200 characters, at about four per token
    with_tools = count([{"role": "user", "content": "hello there"}], [WEATHER_TOOL])
    assert with_tools > short + 20  # the schema is part of the prompt

    # An image counts as routing.image_tokens (1000 by default), not by its 200 KB of base64.
    data = base64.b64encode(os.urandom(150_000)).decode()
    assert len(data) == 200_000
    image = count(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                    {"type": "text", "text": "hello there"},
                ],
            }
        ]
    )
    assert image == short + 1000
    assert image < 2000
    # Counting asks no upstream.
    assert upstreams.small.requests == upstreams.large.requests == upstreams.teacher.requests == []


# --- auth --------------------------------------------------------------------------------------


def test_api_keys_on_the_messages_endpoints(
    connect: Connect, upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK reads a key from the environment when given none.
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS"}
    cfg = write_config(tmp_path / "config.yaml", raw)
    env = {**os.environ, "TRIAGE_TEST_KEYS": "alice:sk-alice"}
    with triage_process(cfg, env=env) as served:
        alice = connect(served.url, "sk-alice")  # the SDK sends it as `x-api-key`
        message = alice.messages.create(model="auto", max_tokens=64, messages=ASK)
        assert message.content[0].type == "text" and message.content[0].text == SMALL_TEXT
        assert alice.messages.count_tokens(model="auto", messages=ASK).input_tokens > 0

        with pytest.raises(anthropic.AuthenticationError) as wrong:
            connect(served.url, "sk-mallory").messages.create(model="auto", max_tokens=64, messages=ASK)
        assert wrong.value.status_code == 401
        body = error_body(wrong.value)
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert isinstance(body["error"]["message"], str) and "sk-mallory" not in body["error"]["message"]

        # No key at all: the SDK is told to send no credentials.
        anonymous = connect(served.url, None, default_headers={"Authorization": anthropic.omit})
        for call in (
            lambda: anonymous.messages.create(model="auto", max_tokens=64, messages=ASK),
            lambda: anonymous.messages.count_tokens(model="auto", messages=ASK),
        ):
            with pytest.raises(anthropic.AuthenticationError) as missing:
                call()
            assert missing.value.status_code == 401
            body = error_body(missing.value)
            assert body["error"]["type"] == "authentication_error"
            assert body["error"]["message"].startswith("Missing API key")
    # Only alice's one request reached an upstream; her key did not go with it.
    assert len(upstreams.small.requests) == 1
    assert "sk-alice" not in json.dumps(upstreams.small.headers)


# --- errors in Anthropic's envelope ------------------------------------------------------------


def test_client_errors_are_anthropic_shaped(connect: Connect, gateway_url: str, upstreams: Upstreams) -> None:
    sdk = connect(gateway_url)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        sdk.messages.create(model="nope", max_tokens=64, messages=ASK)
    assert unknown.value.status_code == 404
    body = error_body(unknown.value)
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]

    # Bodies the SDK's typed methods would not send; each names the field at fault.
    bad_bodies: list[tuple[dict[str, Any], str]] = [
        ({"model": "auto", "messages": ASK}, "max_tokens: Field required"),
        ({"model": "auto", "max_tokens": 64, "messages": []}, "messages:"),
        ({"model": "auto", "max_tokens": 64, "messages": [{"role": "system", "content": "hi"}]}, "role"),
        ({"model": "auto", "max_tokens": -1, "messages": ASK}, "max_tokens:"),
    ]
    for payload, message in bad_bodies:
        with pytest.raises(anthropic.BadRequestError) as bad:
            sdk.post("/v1/messages", body=payload, cast_to=Message)
        assert bad.value.status_code == 400
        body = error_body(bad.value)
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert message in body["error"]["message"]

    broken = httpx.post(
        gateway_url + "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["type"] == "error"
    assert broken.json()["error"]["type"] == "invalid_request_error"

    with pytest.raises(anthropic.BadRequestError) as count_bad:
        sdk.messages.count_tokens(model="auto", messages=[])
    assert error_body(count_bad.value)["error"]["type"] == "invalid_request_error"
    assert upstreams.small.requests == []


def test_upstream_error_status_is_anthropic_shaped(
    connect: Connect, gateway_url: str, upstreams: Upstreams
) -> None:
    for state in (upstreams.small, upstreams.large, upstreams.teacher):
        state.mode = "status"
        state.status = 400
    with pytest.raises(anthropic.BadRequestError) as err:
        connect(gateway_url).messages.create(model="auto", max_tokens=64, messages=ASK)
    assert err.value.status_code == 400
    assert err.value.response.headers["x-triage-model"] == "student-small"
    assert error_body(err.value) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "small failed"},
    }
    # The client's error, not the student's failure: no fallback to the teacher.
    assert len(upstreams.small.requests) == 1 and upstreams.teacher.requests == []


def test_stream_cut_after_hold_back_ends_with_an_error_event(
    connect: Connect, gateway_url: str, upstreams: Upstreams
) -> None:
    upstreams.small.mode = "cut_stream"
    upstreams.small.chunks = 30  # the student dies at word 15, after the 8 held-back events
    sdk = connect(gateway_url)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with sdk.messages.stream(model="auto", max_tokens=64, messages=ASK) as stream:
            for text in stream.text_stream:
                received.append(text)
    body = error_body(err.value)
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    # Everything the student sent before it died arrived; the SDK raised instead of ending the message.
    assert received == [f"small-{i} " for i in range(15)]

    # The raw stream: the error is the last event, and no message_stop came before it.
    with httpx.stream(
        "POST",
        gateway_url + "/v1/messages",
        json={"model": "auto", "max_tokens": 64, "messages": ASK, "stream": True},
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    events = [line for line in lines if line.startswith("event:")]
    assert events[0] == "event: message_start" and events[-1] == "event: error"
    assert "event: message_stop" not in events and "event: message_delta" not in events
    last = json.loads(lines[-1].removeprefix("data:"))
    assert last["type"] == "error" and last["error"]["type"] == "api_error"


# --- cascade -----------------------------------------------------------------------------------


def test_refusal_escalates_to_the_teacher(connect: Connect, gateway_url: str, upstreams: Upstreams) -> None:
    upstreams.small.text = REFUSAL
    sdk = connect(gateway_url)
    labels = {"model": "student-small", "reason": "refusal"}
    before = value(scrape(gateway_url), "triage_fallbacks_total", **labels)

    raw = sdk.messages.with_raw_response.create(model="auto", max_tokens=64, messages=ASK)
    message = raw.parse()
    assert raw.headers["x-triage-fallback"] == "refusal"
    assert raw.headers["x-triage-model"] == "teacher"
    assert message.content[0].type == "text" and message.content[0].text == TEACHER_TEXT
    assert message.model == "up-teacher"
    assert value(scrape(gateway_url), "triage_fallbacks_total", **labels) == before + 1

    with sdk.messages.stream(model="auto", max_tokens=64, messages=ASK) as stream:
        assert stream.response.headers["x-triage-fallback"] == "refusal"
        assert stream.response.headers["x-triage-model"] == "teacher"
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEACHER_TEXT
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    assert value(scrape(gateway_url), "triage_fallbacks_total", **labels) == before + 2
    assert len(upstreams.small.requests) == len(upstreams.teacher.requests) == 2


# --- metrics and cost --------------------------------------------------------------------------


def test_requests_decisions_tokens_and_cost(
    connect: Connect, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    small = {"model": "student-small"}
    teacher = {"model": "teacher"}
    student_cost = PROMPT_TOKENS * SMALL_PRICE[0] + 5 * SMALL_PRICE[1]
    teacher_cost = PROMPT_TOKENS * TEACHER_PRICE[0] + 5 * TEACHER_PRICE[1]
    with make_gateway(base_config(upstreams.urls)) as gw:
        sdk = connect(gw.url)
        sdk.messages.create(model="auto", max_tokens=64, messages=ASK)
        assert (
            gw.metric("triage_requests_total", {**small, "reason": "classifier", "status_class": "2xx"}) == 1
        )
        assert gw.metric("triage_routing_decisions_total", {**small, "reason": "classifier"}) == 1
        assert gw.metric("triage_prompt_tokens_total", {**small, "estimated": "false"}) == PROMPT_TOKENS
        assert gw.metric("triage_completion_tokens_total", {**small, "estimated": "false"}) == 5
        assert gw.metric("triage_cost_usd_total", small) == pytest.approx(student_cost, rel=1e-9)
        # Savings are counted against what the teacher would have cost.
        assert gw.metric("triage_teacher_equivalent_cost_usd_total", small) == pytest.approx(
            teacher_cost, rel=1e-9
        )

        # A streamed answer: usage from the student's last chunk, counted once the stream ends.
        with sdk.messages.stream(model="auto", max_tokens=64, messages=ASK) as stream:
            stream.until_done()
        assert eventually(
            lambda: gw.metric("triage_prompt_tokens_total", {**small, "estimated": "false"}) == 22
        )
        assert gw.metric("triage_completion_tokens_total", {**small, "estimated": "false"}) == 10
        assert gw.metric("triage_cost_usd_total", small) == pytest.approx(2 * student_cost, rel=1e-9)
        assert (
            gw.metric("triage_requests_total", {**small, "reason": "classifier", "status_class": "2xx"}) == 2
        )

        # A refusal: the student's attempt is paid for, the teacher's answer is the one served.
        upstreams.small.text = REFUSAL
        sdk.messages.create(model="auto", max_tokens=64, messages=ASK)
        refusal_cost = PROMPT_TOKENS * SMALL_PRICE[0] + 7 * SMALL_PRICE[1]  # seven words
        assert gw.metric("triage_routing_decisions_total", {**small, "reason": "classifier"}) == 3
        assert (
            gw.metric("triage_requests_total", {**teacher, "reason": "fallback", "status_class": "2xx"}) == 1
        )
        assert gw.metric("triage_fallbacks_total", {**small, "reason": "refusal"}) == 1
        assert gw.metric("triage_cost_usd_total", small) == pytest.approx(
            2 * student_cost + refusal_cost, rel=1e-9
        )
        assert gw.metric("triage_cost_usd_total", teacher) == pytest.approx(teacher_cost, rel=1e-9)
        assert gw.metric("triage_teacher_equivalent_cost_usd_total", teacher) == pytest.approx(
            teacher_cost, rel=1e-9
        )
        assert gw.metric("triage_teacher_equivalent_cost_usd_total", small) == pytest.approx(
            2 * teacher_cost, rel=1e-9
        )
        assert gw.metric("triage_cost_usd_total", {"model": "student-large"}) == 0


# --- passthrough to a model that speaks Messages -----------------------------------------------


class NativeMessages:
    """A model server that speaks Anthropic Messages natively (JSON and the event stream)."""

    text = ["Bonjour ", "from the ", "native ", "server."]
    input_tokens = 21
    output_tokens = 7

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if body.get("stream"):
            return StreamingResponse(self.events(body["model"]), media_type="text/event-stream")
        return JSONResponse(
            {
                "id": "msg_native_1",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": "".join(self.text)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            }
        )

    async def events(self, model: str) -> AsyncIterator[bytes]:
        def sse(event: dict[str, Any]) -> bytes:
            kind: str = event["type"]
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

        message: dict[str, Any] = {
            "id": "msg_native_2",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1},
        }
        yield sse({"type": "message_start", "message": message})
        yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield sse({"type": "ping"})
        for piece in self.text:
            delta = {"type": "text_delta", "text": piece}
            yield sse({"type": "content_block_delta", "index": 0, "delta": delta})
        yield sse({"type": "content_block_stop", "index": 0})
        yield sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": self.output_tokens},
            }
        )
        yield sse({"type": "message_stop"})


def test_passthrough_to_a_native_messages_model(
    connect: Connect, upstreams: Upstreams, tmp_path: Path
) -> None:
    native = NativeMessages()
    with serve(native.app) as native_url:
        raw = base_config(upstreams.urls)
        small = raw["models"][0]
        small["api"] = ["chat", "completions", "messages"]
        small["endpoints"] = [native_url + "/v1"]
        cfg = write_config(tmp_path / "config.yaml", raw)
        with triage_process(cfg) as served:
            sdk = connect(served.url)
            before = scrape(served.url)
            message = sdk.messages.create(
                model="auto",
                max_tokens=64,
                system="Be brief.",
                messages=ASK,
                extra_body={"temperature": 0.5, "top_k": 5},
                metadata={"user_id": "u-1"},
                stop_sequences=["\n\nHuman:"],
            )
            after = scrape(served.url)
            # The native answer, as the server gave it.
            assert message.id == "msg_native_1"
            assert message.model == "up-small"
            assert message.content[0].type == "text" and message.content[0].text == "".join(native.text)
            assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 7)
            # The body went on unchanged but for `model`, fields chat could not carry included.
            assert native.requests == [
                {
                    "model": "up-small",
                    "max_tokens": 64,
                    "system": "Be brief.",
                    "messages": ASK,
                    "temperature": 0.5,
                    "top_k": 5,
                    "metadata": {"user_id": "u-1"},
                    "stop_sequences": ["\n\nHuman:"],
                }
            ]
            assert native.headers[-1]["anthropic-version"] == "2023-06-01"
            labels = {"model": "student-small"}
            prompt = value(after, "triage_prompt_tokens_total", estimated="false", **labels)
            prompt -= value(before, "triage_prompt_tokens_total", estimated="false", **labels)
            assert prompt == 21
            cost = value(after, "triage_cost_usd_total", **labels) - value(
                before, "triage_cost_usd_total", **labels
            )
            assert cost == pytest.approx(21 * SMALL_PRICE[0] + 7 * SMALL_PRICE[1], rel=1e-6)

            with sdk.messages.stream(model="auto", max_tokens=64, messages=ASK) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            assert text == "".join(native.text)
            assert final.id == "msg_native_2"
            assert (final.usage.input_tokens, final.usage.output_tokens) == (21, 7)
            assert native.requests[-1] == {
                "model": "up-small",
                "max_tokens": 64,
                "messages": ASK,
                "stream": True,
            }
            assert native.headers[-1]["anthropic-version"] == "2023-06-01"

            # Every event came through as the server sent it, `ping` included (the SDK skips it).
            with httpx.stream(
                "POST",
                served.url + "/v1/messages",
                json={"model": "auto", "max_tokens": 64, "messages": ASK, "stream": True},
            ) as native_stream:
                kinds = [line for line in native_stream.iter_lines() if line.startswith("event:")]
            assert kinds == [
                "event: message_start",
                "event: content_block_start",
                "event: ping",
                *["event: content_block_delta"] * 4,
                "event: content_block_stop",
                "event: message_delta",
                "event: message_stop",
            ]

            stream_cost = 2 * (21 * SMALL_PRICE[0] + 7 * SMALL_PRICE[1])
            assert eventually(
                lambda: (
                    value(scrape(served.url), "triage_cost_usd_total", **labels)
                    - value(after, "triage_cost_usd_total", **labels)
                    == pytest.approx(stream_cost, rel=1e-6)
                )
            )
            assert eventually(
                lambda: (
                    value(scrape(served.url), "triage_completion_tokens_total", estimated="false", **labels)
                    - value(after, "triage_completion_tokens_total", estimated="false", **labels)
                    == 14
                )
            )
    # Nothing was translated to chat completions.
    assert upstreams.small.requests == []


# --- LangChain's ChatAnthropic -----------------------------------------------------------------


def test_langchain_chat_anthropic(gateway_url: str, upstreams: Upstreams) -> None:
    llm = ChatAnthropic(base_url=gateway_url, api_key="any", model="auto", max_retries=0, max_tokens=64)
    try:
        _langchain_calls(llm, upstreams)
    finally:
        llm._client.close()


def _langchain_calls(llm: ChatAnthropic, upstreams: Upstreams) -> None:
    """invoke, stream and a bound tool, each answered by the student through the translation."""
    reply = llm.invoke("hi")
    assert reply.content == SMALL_TEXT
    assert reply.response_metadata["model"] == "up-small"
    assert reply.response_metadata["model_name"] == "up-small"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == PROMPT_TOKENS
    assert reply.usage_metadata["output_tokens"] == 5

    chunks = list(llm.stream("hi"))
    assert "".join(c.text for c in chunks) == SMALL_TEXT

    upstreams.small.tool_calls = [WEATHER_CALL]
    tooled = llm.bind_tools([dict(WEATHER_TOOL)]).invoke("What is the weather in Paris?")
    assert tooled.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert [(r["model"], r.get("stream")) for r in upstreams.small.requests] == [
        ("up-small", None),
        ("up-small", True),
        ("up-small", None),
    ]
    assert upstreams.small.requests[-1]["tools"][0]["function"]["name"] == "get_weather"
