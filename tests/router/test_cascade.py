"""Quality checks on student answers and escalation to the teacher, JSON and streaming."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.router.test_streaming import stream_events, text_of


def ask(gw: Gateway, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


LOOP = " ".join(["the cat sat on the mat"] * 12)


# A structured-output request: an object with a `name` and an integer `age`.
_NAME_AGE_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "p",
        "schema": {
            "type": "object",
            "required": ["name", "age"],
            "properties": {"age": {"type": "integer"}},
        },
    },
}


@pytest.mark.parametrize(
    ("setup", "extra", "reason"),
    [
        ({"text": ""}, {}, "empty"),
        ({"text": "The answer is", "finish_reason": "length"}, {}, "length"),
        ({"text": "I'm sorry, but I cannot help with that."}, {}, "refusal"),
        ({"text": "Honestly I don't know the answer to this."}, {}, "refusal"),
        ({"text": "{not json"}, {"response_format": {"type": "json_object"}}, "invalid_json"),
        (
            {"text": '{"name": "x"}'},
            {"response_format": _NAME_AGE_FORMAT},
            "invalid_json",
        ),
        (
            {
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{oops"}}
                ]
            },
            {},
            "tool_call",
        ),
        ({"text": LOOP}, {}, "repetition"),
    ],
)
def test_failed_check_escalates_to_teacher(
    gateway: Gateway, upstreams: Upstreams, setup: dict[str, Any], extra: dict[str, Any], reason: str
) -> None:
    for key, value in setup.items():
        setattr(upstreams.small, key, value)
    resp = ask(gateway, **extra)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-triage-model"] == "teacher"
    assert resp.headers["x-triage-reason"] == "fallback"
    assert resp.headers["x-triage-fallback"] == reason
    assert resp.json()["choices"][0]["message"]["content"].startswith("teacher-0")
    assert gateway.metric("triage_fallbacks_total", {"model": "student-small", "reason": reason}) == 1
    # Both attempts are paid for; only the served answer counts toward teacher-only cost.
    assert gateway.metric("triage_cost_usd_total", {"model": "student-small"}) > 0
    assert gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": "student-small"}) == 0
    assert gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": "teacher"}) > 0


@pytest.mark.parametrize(
    ("setup", "extra"),
    [
        (
            {"text": '{"name": "x", "age": 3}'},
            {"response_format": _NAME_AGE_FORMAT},
        ),
        ({"text": '```json\n{"a": 1}\n```'}, {"response_format": {"type": "json_object"}}),
        (
            {
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
                ]
            },
            {},
        ),
        ({"text": "Paris is the capital of France."}, {}),
    ],
)
def test_good_answers_are_served_by_the_student(
    gateway: Gateway, upstreams: Upstreams, setup: dict[str, Any], extra: dict[str, Any]
) -> None:
    for key, value in setup.items():
        setattr(upstreams.small, key, value)
    resp = ask(gateway, **extra)
    assert resp.headers["x-triage-model"] == "student-small"
    assert "x-triage-fallback" not in resp.headers


def test_low_confidence_asks_for_logprobs_and_strips_them(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["checks"] = {"min_mean_logprob": -1.0}
    with make_gateway(raw) as gw:
        resp = ask(gw)
        assert resp.headers["x-triage-model"] == "student-small"
        assert upstreams.small.requests[-1]["logprobs"] is True
        assert "logprobs" not in resp.json()["choices"][0]
        upstreams.small.logprob = -2.5
        resp = ask(gw)
        assert resp.headers["x-triage-fallback"] == "low_confidence"
        # A client that asked for logprobs keeps them.
        upstreams.small.logprob = -0.1
        resp = ask(gw, logprobs=True)
        assert resp.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1


def test_checks_are_configurable_per_model(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["checks"] = {"refusal": False, "refusal_patterns": None}
    raw["models"][1]["checks"] = {"refusal_patterns": ["^nope"]}
    upstreams.small.text = "I'm sorry, but I cannot help with that."
    upstreams.large.text = "Nope, not today."
    with make_gateway(raw) as gw:
        assert ask(gw).headers["x-triage-model"] == "student-small"
        resp = ask(gw, headers={"x-triage-route": "student-large"})
        assert resp.headers["x-triage-fallback"] == "refusal"


def test_opt_out_header_disables_escalation(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.text = ""
    resp = ask(gateway, headers={"x-triage-fallback": "off"})
    assert resp.headers["x-triage-model"] == "student-small"
    assert resp.json()["choices"][0]["message"]["content"] == ""


def test_escalation_budget_cap(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.text = ""
    # Teacher prices are $3/$15 per Mtok: 150 output tokens cost at least $0.00225.
    resp = ask(gateway, headers={"x-triage-escalation-budget-usd": "0.001"}, max_tokens=150)
    assert resp.headers["x-triage-model"] == "student-small"
    resp = ask(gateway, headers={"x-triage-escalation-budget-usd": "1"}, max_tokens=150)
    assert resp.headers["x-triage-model"] == "teacher"
    bad = ask(gateway, headers={"x-triage-escalation-budget-usd": "lots"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "x-triage-escalation-budget-usd"


def test_stream_check_inside_window_switches_to_teacher(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.text = "I'm sorry, but I cannot help with that request today."
    resp, events = stream_events(gateway)
    assert resp.headers["x-triage-model"] == "teacher"
    assert resp.headers["x-triage-fallback"] == "refusal"
    assert text_of(events).startswith("teacher-0")
    assert events[-1] == "[DONE]"


def test_stream_never_switches_after_the_window(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["routing"]["cascade"] = {"hold_back_tokens": 4, "hold_back_ms": 1000}
    # Repetition only becomes visible long after the first 4 tokens.
    upstreams.small.text = "A fine start to this answer. " + LOOP
    with make_gateway(raw) as gw:
        resp, events = stream_events(gw)
        assert resp.headers["x-triage-model"] == "student-small"
        assert text_of(events).startswith("A fine start")
        assert events[-1] == "[DONE]"


def test_hold_back_ms_bounds_the_ttft_cost(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["routing"]["cascade"] = {"hold_back_tokens": 100, "hold_back_ms": 250}
    upstreams.small.chunks = 20
    upstreams.small.chunk_delay_s = 0.1
    with make_gateway(raw) as gw:
        payload = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        start = time.monotonic()
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload) as resp:
            first = None
            for line in resp.iter_lines():
                if line.startswith("data: ") and first is None:
                    first = time.monotonic() - start
        assert first is not None
        # Held until the 250 ms window closed (checked as events arrive, 100 ms apart).
        assert 0.25 <= first < 0.6


def test_stream_length_check_when_stream_ends_in_window(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.text = "Truncated"
    upstreams.small.finish_reason = "length"
    resp, events = stream_events(gateway)
    assert resp.headers["x-triage-fallback"] == "length"
    assert orjson.dumps(events[-1]) == b'"[DONE]"'
