"""Routing and forwarding through a real gateway to fake upstreams over loopback HTTP."""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import orjson
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import closed_port_url

EASY = "thanks!"
HARD = (
    "Prove that the sum of the first n odd numbers equals n^2, step by step, then derive "
    "the closed form of sum k^3 and explain why the induction works. Analyze edge cases. "
    "```python\ndef f(n):\n    return n\n```"
)


def chat(gw: Gateway, content: str, model: str = "auto", **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def answer(resp: httpx.Response) -> str:
    content: str = resp.json()["choices"][0]["message"]["content"]
    return content


def test_easy_prompt_goes_to_cheapest_student(gateway: Gateway, upstreams: Upstreams) -> None:
    resp = chat(gateway, EASY)
    assert resp.status_code == 200
    assert resp.headers["x-triage-model"] == "student-small"
    assert resp.headers["x-triage-reason"] == "classifier"
    assert float(resp.headers["x-triage-score"]) < 0.3
    assert len(resp.headers["x-request-id"]) >= 16
    assert answer(resp).startswith("small-0")
    # The upstream gets its own model name, never the alias.
    assert upstreams.small.requests[-1]["model"] == "up-small"


def test_hard_prompt_goes_to_teacher(gateway: Gateway, upstreams: Upstreams) -> None:
    resp = chat(gateway, HARD)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-triage-model"] == "teacher"
    assert float(resp.headers["x-triage-score"]) >= 0.5
    assert answer(resp).startswith("teacher-0")
    assert upstreams.small.requests == []


def test_pinned_model_skips_scoring(gateway: Gateway) -> None:
    resp = chat(gateway, HARD, model="student-large")
    assert resp.headers["x-triage-model"] == "student-large"
    assert resp.headers["x-triage-reason"] == "pinned"
    assert "x-triage-score" not in resp.headers
    assert answer(resp).startswith("large-0")


def test_override_header_wins(gateway: Gateway) -> None:
    resp = chat(gateway, EASY, headers={"x-triage-route": "teacher"})
    assert resp.headers["x-triage-model"] == "teacher"
    assert resp.headers["x-triage-reason"] == "override"


def test_override_header_can_be_disabled(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls, allow_override_header=False)) as gw:
        resp = chat(gw, EASY, headers={"x-triage-route": "teacher"})
        assert resp.headers["x-triage-model"] == "student-small"
        assert resp.headers["x-triage-reason"] == "classifier"


def test_context_window_skips_small_student(gateway: Gateway) -> None:
    # 200-token window on the small student: a long but simple prompt moves up a rung.
    long_easy = "hello there " * 60
    resp = chat(gateway, long_easy, max_tokens=100)
    assert resp.status_code == 200
    assert float(resp.headers["x-triage-score"]) < 0.3
    assert resp.headers["x-triage-model"] == "student-large"
    assert resp.headers["x-triage-reason"] == "context"


def test_unknown_model_is_404_model_not_found(gateway: Gateway) -> None:
    resp = chat(gateway, EASY, model="gpt-17")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "model_not_found"
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "model"
    assert "gpt-17" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (orjson.dumps({"model": "auto"}), "messages"),
        (orjson.dumps({"model": "auto", "messages": []}), "messages"),
        (
            orjson.dumps({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages.0.role",
        ),
        (
            orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}),
            "max_tokens",
        ),
        (orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 100000}), "n"),
        (orjson.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}), "model"),
    ],
)
def test_bad_bodies_are_400_with_param(gateway: Gateway, body: bytes, param: str | None) -> None:
    resp = httpx.post(
        gateway.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_body_over_limit_is_413(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["server"] = {"max_body_bytes": 1000}
    with make_gateway(raw) as gw:
        resp = chat(gw, "x" * 2000)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large"


def test_dead_student_falls_back_to_teacher(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1", closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        resp = chat(gw, EASY)
        assert resp.status_code == 200
        assert resp.headers["x-triage-model"] == "teacher"
        assert resp.headers["x-triage-reason"] == "fallback"
        assert answer(resp).startswith("teacher-0")
        # Both endpoints were tried (retry once), then the teacher.
        assert (
            gw.metric("triage_upstream_errors_total", {"model": "student-small", "type": "unavailable"}) == 2
        )
        assert (
            gw.metric("triage_fallbacks_total", {"model": "student-small", "reason": "upstream_error"}) == 1
        )


def test_retry_on_second_endpoint_of_same_model(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls, breaker_failures=1, endpoint_cooldown_s=30)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1", upstreams.urls["small"] + "/v1"]
    with make_gateway(raw) as gw:
        for _ in range(3):
            resp = chat(gw, EASY)
            assert resp.headers["x-triage-model"] == "student-small"
            assert resp.headers["x-triage-reason"] == "classifier"
        # The dead endpoint's circuit opened, so it was hit once, not three times.
        assert (
            gw.metric("triage_upstream_errors_total", {"model": "student-small", "type": "unavailable"}) == 1
        )
        assert gw.metric("triage_circuit_state", {"model": "student-small", "endpoint": "0"}) == 2


def test_student_5xx_falls_back_and_4xx_passes_through(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    resp = chat(gateway, EASY)
    assert resp.status_code == 200
    assert resp.headers["x-triage-model"] == "teacher"
    upstreams.small.status = 422
    resp = chat(gateway, EASY, model="student-small")
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == "small failed"
    assert resp.headers["x-triage-model"] == "student-small"


def test_malformed_upstream_json_is_never_a_200(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "malformed"
    resp = chat(gateway, EASY)
    assert resp.status_code == 200
    assert resp.headers["x-triage-model"] == "teacher"
    upstreams.teacher.mode = "malformed"
    resp = chat(gateway, EASY)
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "upstream_error"


def test_teacher_timeout_is_504(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][2]["read_timeout_s"] = 0.2
    upstreams.teacher.delay_s = 1.0
    with make_gateway(raw) as gw:
        resp = chat(gw, HARD)
        assert resp.status_code == 504
        assert resp.json()["error"]["type"] == "upstream_timeout"
        assert "127.0.0.1" not in resp.text


def test_teacher_unreachable_is_502(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][2]["endpoints"] = [closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        resp = chat(gw, HARD)
        assert resp.status_code == 502
        assert resp.json()["error"]["type"] == "upstream_error"
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 503


def test_completions_endpoint(gateway: Gateway, upstreams: Upstreams) -> None:
    resp = httpx.post(
        gateway.url + "/v1/completions", json={"model": "auto", "prompt": "Say hi", "max_tokens": 5}
    )
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["text"].startswith("small-0")
    assert upstreams.small.requests[-1] == {"model": "up-small", "prompt": "Say hi", "max_tokens": 5}


def test_client_fields_forwarded_untouched(gateway: Gateway, upstreams: Upstreams) -> None:
    chat(gateway, EASY, temperature=0.2, top_k=5, seed=1, headers={"authorization": "Bearer client"})
    sent = upstreams.small.requests[-1]
    assert sent["temperature"] == 0.2 and sent["top_k"] == 5 and sent["seed"] == 1
    assert "max_tokens" not in sent  # no defaults injected
    assert "authorization" not in upstreams.small.headers[-1]


def test_models_health_ready(gateway: Gateway) -> None:
    models = httpx.get(gateway.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["auto", "student-small", "student-large", "teacher"]
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/readyz").status_code == 200
    missing = httpx.get(gateway.url + "/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"


def test_client_headers_are_not_forwarded(gateway: Gateway, upstreams: Upstreams) -> None:
    chat(
        gateway,
        EASY,
        headers={
            "proxy-authorization": "Basic eDp5",
            "te": "trailers",
            "upgrade": "h2c",
            "x-forwarded-for": "10.1.2.3",
            "cookie": "session=abc",
            "x-request-id": "req-123",
        },
    )
    sent = upstreams.small.headers[-1]
    for name in ("proxy-authorization", "te", "upgrade", "x-forwarded-for", "cookie"):
        assert name not in sent
    assert sent["x-request-id"] == "req-123"  # the one header that is passed on, for tracing
