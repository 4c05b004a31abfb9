"""The fault matrix: every misbehaving upstream ends in a correct answer or a clear OpenAI error.

Never a hang past the deadline, never a 200 with a truncated or corrupted body,
never a leaked connection.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import closed_port_url
from tests.raw_upstream import RawMode, raw_upstream
from tests.router.test_streaming import stream_events, text_of


def ask(gw: Gateway, model: str = "auto", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)


def assert_teacher_answer(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-triage-model"] == "teacher"
    assert resp.json()["choices"][0]["message"]["content"].startswith("teacher-0")


def assert_openai_error(resp: httpx.Response, status: int, type_: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", ["reset_mid_body", "garbage", "close_after_headers"])
def test_broken_student_connection_falls_back(
    upstreams: Upstreams, make_gateway: GatewayFactory, mode: RawMode
) -> None:
    with raw_upstream(mode) as url:
        raw = base_config(upstreams.urls)
        raw["models"][0]["endpoints"] = [url + "/v1"]
        with make_gateway(raw) as gw:
            resp = ask(gw)
            assert_teacher_answer(resp)
            assert resp.headers["x-triage-fallback"] == "upstream_error"
            # The teacher broken the same way: a 502, never a partial 200.
            raw["models"][2]["endpoints"] = [url + "/v1"]
        with make_gateway(raw) as gw:
            assert_openai_error(ask(gw), 502, "upstream_error")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_student_5xx_falls_back(gateway: Gateway, upstreams: Upstreams, status: int) -> None:
    upstreams.small.mode = "status"
    upstreams.small.status = status
    assert_teacher_answer(ask(gateway))


def test_429_retry_after_is_honoured(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.mode = "status"
    upstreams.small.status = 429  # the fake sends retry-after: 1
    with make_gateway(base_config(upstreams.urls, breaker_failures=100)) as gw:
        assert_teacher_answer(ask(gw))
        seen = len(upstreams.small.requests)
        # For the next second the rate-limited endpoint is left alone.
        for _ in range(3):
            assert_teacher_answer(ask(gw))
        assert len(upstreams.small.requests) == seen
        assert gw.metric("triage_circuit_state", {"model": "student-small", "endpoint": "0"}) == 2
        # The teacher rate-limited too: the client gets the 429 and its Retry-After.
        upstreams.teacher.mode = "status"
        upstreams.teacher.status = 429
        resp = ask(gw, model="teacher")
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "1"


def test_hang_before_first_byte_times_out_then_falls_back(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["read_timeout_s"] = 0.3
    upstreams.small.delay_s = 5
    with make_gateway(raw) as gw:
        start = time.monotonic()
        resp = ask(gw)
        assert_teacher_answer(resp)
        assert resp.headers["x-triage-fallback"] == "timeout"
        assert time.monotonic() - start < 1.5


def test_overall_deadline_bounds_retries(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls, request_deadline_s=0.6)
    upstreams.small.delay_s = 5
    upstreams.teacher.delay_s = 5
    with make_gateway(raw) as gw:
        start = time.monotonic()
        resp = ask(gw)
        elapsed = time.monotonic() - start
        assert_openai_error(resp, 504, "upstream_timeout")
        assert "0.6 s" in resp.json()["error"]["message"]
        assert 0.55 < elapsed < 1.5
        assert gw.metric("triage_deadline_exceeded_total", {"model": "student-small"}) == 1


def test_stall_mid_stream_ends_with_error_event(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["read_timeout_s"] = 0.4
    upstreams.small.mode = "stall"
    upstreams.small.chunks = 30  # stalls after the hold-back window
    with make_gateway(raw) as gw:
        start = time.monotonic()
        resp, events = stream_events(gw)
        assert resp.headers["x-triage-model"] == "student-small"
        assert events[-1]["error"]["type"] == "upstream_timeout"
        assert "[DONE]" not in events
        assert time.monotonic() - start < 2


def test_broken_sse_frame(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "broken_frame"
    upstreams.small.chunks = 30  # after the window: the stream ends with an error event
    resp, events = stream_events(gateway)
    assert resp.headers["x-triage-model"] == "student-small"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert "malformed" in events[-1]["error"]["message"]
    upstreams.small.chunks = 4  # inside the window: switch to the teacher
    resp, events = stream_events(gateway)
    assert resp.headers["x-triage-model"] == "teacher"
    assert text_of(events).startswith("teacher-0")


def test_slow_upstream_with_many_waiting(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["max_connections"] = 8
    upstreams.small.delay_s = 0.2
    with make_gateway(raw) as gw, ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: ask(gw), range(64)))
    assert all(r.status_code == 200 for r in responses)
    assert all(r.headers["x-triage-model"] == "student-small" for r in responses)


def test_circuit_opens_and_probes_back_in(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls, breaker_failures=2, endpoint_cooldown_s=0.3, retries_per_model=0)
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    labels = {"model": "student-small", "endpoint": "0"}
    with make_gateway(raw) as gw:
        for _ in range(2):
            assert_teacher_answer(ask(gw))
        assert gw.metric("triage_circuit_state", labels) == 2
        hits = len(upstreams.small.requests)
        assert_teacher_answer(ask(gw))  # open: the student is not even tried
        assert len(upstreams.small.requests) == hits
        upstreams.small.mode = "ok"
        time.sleep(0.35)
        resp = ask(gw)  # half-open probe succeeds
        assert resp.headers["x-triage-model"] == "student-small"
        assert gw.metric("triage_circuit_state", labels) == 0
        for state in ("open", "half_open", "closed"):
            assert gw.metric("triage_circuit_transitions_total", {**labels, "state": state}) == 1


def test_retry_budget_stops_amplification(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls, retry_budget_ratio=0.0, retry_budget_burst=2, breaker_failures=1000)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        assert_teacher_answer(ask(gw))
        assert_teacher_answer(ask(gw))
        assert_openai_error(ask(gw), 502, "upstream_error")
        assert gw.metric("triage_retry_budget_exhausted_total") == 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_connection_leak_under_faults(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with raw_upstream("reset_mid_body") as url:
        raw = base_config(upstreams.urls)
        raw["models"][0]["endpoints"] = [url + "/v1"]
        raw["models"][1]["read_timeout_s"] = 0.05
        upstreams.large.delay_s = 0.2
        with make_gateway(raw) as gw, httpx.Client(base_url=gw.url) as client:

            def burst() -> None:
                for i in range(60):
                    model = ("auto", "student-large", "teacher")[i % 3]
                    client.post(
                        "/v1/chat/completions",
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    )

            burst()
            before = _fds()
            burst()
            burst()
            # Failed attempts close their sockets: only keep-alive connections remain.
            assert _fds() <= before + 4


def test_endless_stream_event_is_cut_off(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "huge_event"
    resp, events = stream_events(gateway)
    # Nothing was sent yet, so the teacher answers instead.
    assert resp.headers["x-triage-model"] == "teacher"
    assert text_of(events).startswith("teacher-0")
    assert (
        gateway.metric("triage_upstream_errors_total", {"model": "student-small", "type": "unavailable"}) == 1
    )
