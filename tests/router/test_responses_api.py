"""End to end: the Responses API (`POST /v1/responses`) through the gateway, with the official clients.

The official `openai` SDK and LangChain's `ChatOpenAI` talk to `triage serve` (or, where
metrics are read, an in-process gateway on a real socket). The fake students speak only
chat completions, so the gateway translates; one config gives a student a native
`/v1/responses` server instead, and the gateway passes the request through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import openai
import orjson
import pytest
from langchain_openai import ChatOpenAI
from openai.types.responses import FunctionToolParam, ResponseFunctionToolCall, ResponseInputParam
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import serve, serving

SMALL_TEXT = "small-0 small-1 small-2 small-3 small-4 "
TEACHER_TEXT = "teacher-0 teacher-1 teacher-2 teacher-3 teacher-4 "
REFUSAL = "I'm sorry, I can't help with that."
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
# A one-message answer streamed in two text deltas, as the Responses API sends it.
TWO_DELTA_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
# Every event of a translated one-message answer, in order (the fake streams five words).
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def triage_serve(_upstream_servers: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `triage serve` process for the module, in front of the session's fake upstreams."""
    with serving(base_config(_upstream_servers.urls), tmp_path_factory.mktemp("responses")) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0)


def usd(prompt: int, completion: int, price_in: float, price_out: float) -> float:
    return (prompt * price_in + completion * price_out) / 1e6


# --- translated to chat completions ------------------------------------------------------


def test_non_streaming_answer_is_translated_from_chat(triage_serve: str, upstreams: Upstreams) -> None:
    with sdk(triage_serve) as client:
        raw = client.responses.with_raw_response.create(
            model="auto", input="hello", instructions="Answer briefly."
        )
    got = raw.parse()
    assert raw.headers["x-triage-model"] == "student-small"
    assert raw.headers["x-triage-reason"] == "classifier"
    assert got.output_text == SMALL_TEXT
    assert got.status == "completed"
    assert got.model == "up-small"  # the upstream's own model id
    assert got.usage is not None
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (11, 5, 16)
    # The student was asked in chat completions: instructions became the system message.
    (sent,) = upstreams.small.requests
    assert sent["model"] == "up-small"
    assert sent["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hello"},
    ]
    assert "input" not in sent and "instructions" not in sent
    assert not sent.get("stream") and "stream_options" not in sent
    assert upstreams.large.requests == [] and upstreams.teacher.requests == []


def test_streaming_events_in_order_with_usage(triage_serve: str, upstreams: Upstreams) -> None:
    with sdk(triage_serve) as client:
        events = list(client.responses.create(model="auto", input="hello", instructions="Hi.", stream=True))
        assert [e.type for e in events] == TEXT_EVENTS
        assert [e.sequence_number for e in events] == list(range(len(events)))
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == SMALL_TEXT
        final = events[-1]
        assert final.type == "response.completed"
        assert final.response.output_text == SMALL_TEXT
        assert final.response.usage is not None
        assert (final.response.usage.input_tokens, final.response.usage.output_tokens) == (11, 5)
        sent = upstreams.small.requests[-1]
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}  # asked for by the gateway
        assert sent["messages"][0] == {"role": "system", "content": "Hi."}

        # The SDK's stream helper assembles the same answer.
        with client.responses.stream(model="auto", input="hello again") as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final_response = stream.get_final_response()
    assert text == SMALL_TEXT
    assert final_response.output_text == SMALL_TEXT
    assert final_response.usage is not None and final_response.usage.output_tokens == 5


def _function_calls(output: list[Any]) -> list[ResponseFunctionToolCall]:
    return [item for item in output if isinstance(item, ResponseFunctionToolCall)]


def test_tool_call_round_trip(triage_serve: str, upstreams: Upstreams) -> None:
    upstreams.small.tool_calls = [WEATHER_CALL]
    question: ResponseInputParam = [{"role": "user", "content": "Weather in Paris?"}]
    with sdk(triage_serve) as client:
        got = client.responses.create(model="auto", input=question, tools=[WEATHER_TOOL])
        (call,) = _function_calls(got.output)
        assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
        assert got.output_text == ""
        assert upstreams.small.requests[-1]["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parameters": WEATHER_TOOL["parameters"],
                    "strict": True,
                },
            }
        ]

        events = list(
            client.responses.create(model="auto", input=question, tools=[WEATHER_TOOL], stream=True)
        )
        kinds = [e.type for e in events]
        assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
        assert kinds[-3:] == [
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        streamed_args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert streamed_args == '{"city": "Paris"}'
        final = events[-1]
        assert final.type == "response.completed"
        (streamed,) = _function_calls(final.response.output)
        assert (streamed.call_id, streamed.name, streamed.arguments) == (
            "call_1",
            "get_weather",
            '{"city": "Paris"}',
        )

        # The client runs the tool and sends the call and its output back.
        upstreams.small.tool_calls = None
        upstreams.small.text = "It is sunny in Paris."
        answer = client.responses.create(
            model="auto",
            tools=[WEATHER_TOOL],
            input=[
                *question,
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
            ],
        )
    assert answer.output_text == "It is sunny in Paris."
    assert upstreams.small.requests[-1]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]


def test_stored_state_is_refused(triage_serve: str, upstreams: Upstreams) -> None:
    with sdk(triage_serve) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="auto", input="and then?", previous_response_id="resp_123")
        assert err.value.param == "previous_response_id"
        assert "does not store responses" in err.value.message
        assert "send the whole conversation in `input`" in err.value.message

        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="auto", input="hello", store=True)
        assert err.value.param == "store"
        assert "does not store responses" in err.value.message

        # `store: false` is what a stateless client sends, and it is served.
        assert client.responses.create(model="auto", input="hello", store=False).output_text == SMALL_TEXT
    assert len(upstreams.small.requests) == 1


# --- cascade, metrics and cost (in-process gateway, its registry read directly) ------------


def test_refusal_escalates_to_teacher(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.text = REFUSAL
    fallbacks = "triage_fallbacks_total"
    labels = {"model": "student-small", "reason": "refusal"}
    with make_gateway(base_config(upstreams.urls)) as gw, sdk(gw.url) as client:
        raw = client.responses.with_raw_response.create(model="auto", input="hello")
        got = raw.parse()
        assert got.output_text == TEACHER_TEXT
        assert got.model == "up-teacher"
        assert raw.headers["x-triage-model"] == "teacher"
        assert raw.headers["x-triage-fallback"] == "refusal"
        assert raw.headers["x-triage-attempted"] == "student-small,teacher"
        assert gw.metric(fallbacks, labels) == 1
        # The teacher was asked the same translated chat request.
        assert upstreams.teacher.requests[-1]["messages"] == [{"role": "user", "content": "hello"}]

        # Streaming: the refusal is caught in the held-back events; the client sees only the teacher.
        with client.responses.with_streaming_response.create(
            model="auto", input="hello", stream=True
        ) as streamed:
            assert streamed.headers["x-triage-model"] == "teacher"
            assert streamed.headers["x-triage-fallback"] == "refusal"
            events = list(streamed.parse())
        assert [e.type for e in events] == TEXT_EVENTS
        final = events[-1]
        assert final.type == "response.completed"
        assert final.response.output_text == TEACHER_TEXT
        assert gw.metric(fallbacks, labels) == 2
        assert (
            gw.metric(
                "triage_requests_total", {"model": "teacher", "reason": "fallback", "status_class": "2xx"}
            )
            == 2
        )
    assert len(upstreams.small.requests) == 2 and len(upstreams.teacher.requests) == 2


def _two_served(prompt: int, completion: int) -> dict[str, Any]:
    """What two classifier-routed answers of these sizes add to student-small's counters."""
    return {
        "requests": 2,
        "decisions": 2,
        "prompt": 2 * prompt,
        "completion": 2 * completion,
        "cost": pytest.approx(2 * usd(prompt, completion, 0.1, 0.2)),
        "teacher_cost": pytest.approx(2 * usd(prompt, completion, 3.0, 15.0)),
        "scored": 2,
    }


def _served_counts(gw: Gateway, model: str) -> dict[str, float]:
    return {
        "requests": gw.metric(
            "triage_requests_total", {"model": model, "reason": "classifier", "status_class": "2xx"}
        ),
        "decisions": gw.metric("triage_routing_decisions_total", {"model": model, "reason": "classifier"}),
        "prompt": gw.metric("triage_prompt_tokens_total", {"model": model, "estimated": "false"}),
        "completion": gw.metric("triage_completion_tokens_total", {"model": model, "estimated": "false"}),
        "cost": gw.metric("triage_cost_usd_total", {"model": model}),
        "teacher_cost": gw.metric("triage_teacher_equivalent_cost_usd_total", {"model": model}),
        "scored": gw.metric("triage_classifier_duration_seconds_count"),
    }


def test_metrics_and_cost_follow_the_served_model(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.text = "one two three"  # 3 completion tokens; the fake reports 11 prompt tokens
    with make_gateway(base_config(upstreams.urls)) as gw, sdk(gw.url) as client:
        before = _served_counts(gw, "student-small")
        assert client.responses.create(model="auto", input="hello").output_text == "one two three"
        events = list(client.responses.create(model="auto", input="hello", stream=True))
        assert events[-1].type == "response.completed"
        after = _served_counts(gw, "student-small")
        untouched = _served_counts(gw, "teacher")
    moved = {k: after[k] - before[k] for k in after}
    assert moved == _two_served(11, 3)
    assert untouched["requests"] == untouched["cost"] == 0


# --- a student that speaks the Responses API natively ------------------------------------

NATIVE_TEXT = ["Native ", "answer."]
NATIVE_USAGE = {
    "input_tokens": 7,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 3,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 10,
}


def _native_message(text: str, status: str) -> dict[str, Any]:
    return {
        "id": "msg_native",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _native_response(body: dict[str, Any], status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_native",
        "object": "response",
        "created_at": 1_750_000_000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": NATIVE_USAGE if status == "completed" else None,
    }


def _sse(events: list[dict[str, Any]]) -> Iterator[bytes]:
    for seq, event in enumerate(events):
        event["sequence_number"] = seq
        yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


async def _native_stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
    where = {"item_id": "msg_native", "output_index": 0, "content_index": 0}
    text = "".join(NATIVE_TEXT)
    started = _native_response(body, "in_progress", [])
    empty = _native_message("", "in_progress")
    empty["content"] = []
    done = _native_message(text, "completed")
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": empty},
        {
            "type": "response.content_part.added",
            **where,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
        *({"type": "response.output_text.delta", **where, "delta": d, "logprobs": []} for d in NATIVE_TEXT),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed", "response": _native_response(body, "completed", [done])},
    ]
    for chunk in _sse(events):
        yield chunk


@contextmanager
def native_responses_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A model server that speaks `/v1/responses` itself; yields its URL and the bodies it received."""
    bodies: list[dict[str, Any]] = []

    async def responses(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        if body.get("stream"):
            return StreamingResponse(_native_stream(body), media_type="text/event-stream")
        done = _native_message("".join(NATIVE_TEXT), "completed")
        return JSONResponse(_native_response(body, "completed", [done]))

    with serve(Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])])) as url:
        yield url, bodies


def test_native_responses_upstream_gets_the_request_unchanged(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    with native_responses_server() as (native_url, received):
        raw = base_config(upstreams.urls)
        small = raw["models"][0]
        small["endpoints"] = [native_url + "/v1"]
        small["api"] = ["chat", "completions", "responses"]
        with make_gateway(raw) as gw, sdk(gw.url) as client:
            before = _served_counts(gw, "student-small")
            resp = client.responses.with_raw_response.create(
                model="auto",
                input="hello",
                instructions="Answer briefly.",
                temperature=0.5,
                metadata={"trace": "t-1"},
                truncation="auto",
                store=False,
            )
            got = resp.parse()
            assert resp.headers["x-triage-model"] == "student-small"
            # Fields the chat translation would drop or rename reach the native server as sent.
            assert received[-1] == {
                "model": "up-small",
                "input": "hello",
                "instructions": "Answer briefly.",
                "temperature": 0.5,
                "metadata": {"trace": "t-1"},
                "truncation": "auto",
                "store": False,
            }
            assert got.id == "resp_native"
            assert got.output_text == "Native answer."
            assert got.usage is not None and got.usage.total_tokens == 10

            events = list(
                client.responses.create(model="auto", input=[{"role": "user", "content": "hi"}], stream=True)
            )
            assert received[-1] == {
                "model": "up-small",
                "input": [{"role": "user", "content": "hi"}],
                "stream": True,
            }
            assert [e.type for e in events] == TWO_DELTA_EVENTS
            final = events[-1]
            assert final.type == "response.completed"
            assert final.response.id == "resp_native"
            assert final.response.output_text == "Native answer."
            after = _served_counts(gw, "student-small")
    assert len(received) == 2
    assert upstreams.small.requests == []  # the chat-only fake was never asked
    moved = {k: after[k] - before[k] for k in after}
    assert moved == _two_served(7, 3)


# --- LangChain -----------------------------------------------------------------------------


def test_langchain_responses_api(triage_serve: str, upstreams: Upstreams) -> None:
    llm = ChatOpenAI(
        base_url=triage_serve + "/v1",
        api_key="x",
        model="auto",
        use_responses_api=True,
        max_retries=0,
    )
    message = llm.invoke("hi")
    assert message.text == SMALL_TEXT
    # The gateway passes on the upstream's own model id, not the routing alias.
    assert message.response_metadata["model_name"] == "up-small"
    assert upstreams.small.requests[-1]["messages"][-1] == {"role": "user", "content": "hi"}

    chunks = list(llm.stream("hi"))
    assert "".join(chunk.text for chunk in chunks) == SMALL_TEXT
    assert upstreams.small.requests[-1]["stream"] is True
    assert upstreams.large.requests == [] and upstreams.teacher.requests == []
