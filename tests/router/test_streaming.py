"""Streaming pass-through: chunks as they arrive, usage handling, failures before and after the first byte."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import orjson

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import closed_port_url


def stream_events(gw: Gateway, **body: Any) -> tuple[httpx.Response, list[Any]]:
    payload = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    payload.update(body)
    events: list[Any] = []
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=10) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else orjson.loads(data))
    return resp, events


def text_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


def test_stream_passes_chunks_and_strips_unrequested_usage(gateway: Gateway, upstreams: Upstreams) -> None:
    resp, events = stream_events(gateway)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-triage-model"] == "student-small"
    assert text_of(events) == "".join(f"small-{i} " for i in range(5))
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)
    # The gateway asked for usage anyway, so the tokens are exact.
    assert upstreams.small.requests[-1]["stream_options"] == {"include_usage": True}
    labels = {"model": "student-small", "estimated": "false"}
    assert gateway.metric("triage_completion_tokens_total", labels) == 5
    assert gateway.metric("triage_prompt_tokens_total", labels) == 11


def test_stream_keeps_usage_when_client_asks(gateway: Gateway) -> None:
    _, events = stream_events(gateway, stream_options={"include_usage": True})
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1
    assert usage[0]["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert usage[0]["choices"] == []


def test_chunks_arrive_as_they_are_produced(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.chunk_delay_s = 0.2
    payload = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    arrivals = []
    start = time.monotonic()
    # No quality hold-back for this request: nothing may be buffered.
    headers = {"x-triage-fallback": "off"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=payload, headers=headers) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
    # Five chunks 0.2 s apart: the first must not wait for the last.
    assert arrivals[0] < 0.15
    assert arrivals[-1] > 0.8


def test_stream_falls_back_before_first_byte(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        resp, events = stream_events(gw)
        assert resp.headers["x-triage-model"] == "teacher"
        assert resp.headers["x-triage-reason"] == "fallback"
        assert text_of(events).startswith("teacher-0")
        assert events[-1] == "[DONE]"


def test_upstream_error_event_first_is_retried_on_teacher(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "stream_error"
    resp, events = stream_events(gateway)
    assert resp.headers["x-triage-model"] == "teacher"
    assert text_of(events).startswith("teacher-0")


def test_mid_stream_failure_ends_with_error_event(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "cut_stream"
    upstreams.small.chunks = 30  # the cut comes after the hold-back window
    resp, events = stream_events(gateway)
    assert resp.status_code == 200
    assert resp.headers["x-triage-model"] == "student-small"  # never switches after bytes went out
    assert text_of(events) == "".join(f"small-{i} " for i in range(15))
    assert events[-1]["error"]["type"] == "upstream_error"
    assert "[DONE]" not in events


def test_stream_without_done_is_reported_truncated(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "no_done"
    upstreams.small.chunks = 30
    _, events = stream_events(gateway)
    assert events[-1]["error"]["type"] == "upstream_error"
    assert "before completing" in events[-1]["error"]["message"]
    assert (
        gateway.metric("triage_upstream_errors_total", {"model": "student-small", "type": "truncated"}) == 1
    )


def test_stream_usage_estimated_when_upstream_gives_none(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "no_usage"
    stream_events(gateway)
    assert gateway.metric("triage_usage_missing_total", {"model": "student-small"}) == 1
    assert (
        gateway.metric("triage_completion_tokens_total", {"model": "student-small", "estimated": "true"}) == 5
    )
