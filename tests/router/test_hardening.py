"""Hostile and unlucky requests: deep JSON, clients that leave, admission limits, pinning, reloads."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import closed_port_url

EASY = {"role": "user", "content": "hi"}


def _raw_request(url: str, body: dict[str, Any]) -> socket.socket:
    """Send a chat completion over a raw socket and return it unread (the client can then leave)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("depth", [300, 1000])
def test_deeply_nested_json_is_a_400(gateway: Gateway, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": ' + nested + "}"
    resp = httpx.post(
        gateway.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "deeper" in resp.json()["error"]["message"]
    assert gateway.metric("triage_rejected_requests_total", {"code": "400"}) == 1


def test_moderately_nested_tool_schema_is_accepted(gateway: Gateway) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    resp = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "auto", "messages": [EASY], "tools": tools}
    )
    assert resp.status_code == 200, resp.text


def test_client_leaving_a_json_request_cancels_the_upstream(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["read_timeout_s"] = 1.0
    upstreams.small.delay_s = 3.0
    with make_gateway(raw) as gw:
        sock = _raw_request(gw.url, {"model": "auto", "messages": [EASY]})
        assert _wait_for(lambda: len(upstreams.small.requests) == 1)
        sock.close()
        # The student attempt is cancelled at once, instead of running to its read timeout
        # and then asking (and paying) the teacher for an answer nobody reads.
        assert _wait_for(
            lambda: gw.metric("triage_client_disconnects_total", {"model": "student-small"}) == 1, 2.0
        )
        assert gw.metric("triage_inflight_requests", {"model": "student-small"}) == 0
        time.sleep(1.5)
        assert upstreams.teacher.requests == []
        assert gw.metric("triage_upstream_errors_total", {"model": "student-small", "type": "timeout"}) == 0
        assert gw.metric("triage_admitted_requests") == 0


def test_client_leaving_inside_the_hold_back_window_cancels_the_upstream(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["read_timeout_s"] = 1.0
    raw["routing"]["cascade"] = {"hold_back_ms": 5000, "hold_back_tokens": 8}
    upstreams.small.chunks = 20
    upstreams.small.chunk_delay_s = 0.3  # the window is still open when the client leaves
    with make_gateway(raw) as gw:
        sock = _raw_request(gw.url, {"model": "auto", "messages": [EASY], "stream": True})
        assert _wait_for(lambda: len(upstreams.small.requests) == 1)
        time.sleep(0.5)
        sock.close()
        assert _wait_for(
            lambda: gw.metric("triage_client_disconnects_total", {"model": "student-small"}) == 1, 2.0
        )
        time.sleep(1.5)
        assert upstreams.teacher.requests == []
        assert gw.metric("triage_admitted_requests") == 0


def test_admission_limit_answers_503_with_retry_after(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["server"] = {"max_inflight_requests": 4}
    upstreams.small.delay_s = 1.0
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(
            httpx.post(
                gw.url + "/v1/chat/completions", json={"model": "auto", "messages": [EASY]}, timeout=30
            )
        )

    with make_gateway(raw) as gw:
        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ok = [r for r in results if r.status_code == 200]
    over = [r for r in results if r.status_code == 503]
    assert len(ok) + len(over) == 12
    assert len(ok) >= 4 and over, [r.status_code for r in results]
    for r in over:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert "x-triage-model" not in r.headers
    assert len(upstreams.small.requests) == len(ok)
    assert upstreams.teacher.requests == []


def test_error_headers_name_no_model_that_did_not_answer(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1"]
    raw["models"][2]["endpoints"] = [closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": [EASY]})
    assert resp.status_code == 502
    assert "x-triage-model" not in resp.headers
    assert resp.headers["x-triage-attempted"].split(",")[-1] == "teacher"
    assert resp.headers["x-triage-reason"] == "fallback"


def test_teacher_error_status_names_the_teacher(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.mode = upstreams.teacher.mode = "status"
    upstreams.small.status = upstreams.teacher.status = 503
    with make_gateway(base_config(upstreams.urls)) as gw:
        resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": [EASY]})
    assert resp.status_code == 503
    assert resp.headers["x-triage-model"] == "teacher"  # the teacher's own error is passed on


def test_pinning_can_be_turned_off_and_allowed_per_key(
    upstreams: Upstreams, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIAGE_TEST_KEYS", "app:k-app,ops:k-ops")
    raw = base_config(upstreams.urls, allow_override_header=False, pinnable_models=[])
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS", "pinning": {"ops": ["teacher"]}}

    def ask(key: str, model: str, **headers: str) -> httpx.Response:
        return httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": model, "messages": [EASY]},
            headers={"authorization": f"Bearer {key}", **headers},
        )

    with make_gateway(raw) as gw:
        denied = ask("k-app", "teacher")
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "model_not_allowed"
        assert denied.json()["error"]["param"] == "model"
        assert ask("k-app", "auto").headers["x-triage-model"] == "student-small"
        assert ask("k-ops", "teacher").headers["x-triage-model"] == "teacher"
        assert ask("k-ops", "student-large").status_code == 403
        # With the header off, it cannot be used to get around the policy either.
        assert (
            ask("k-app", "auto", **{"x-triage-route": "teacher"}).headers["x-triage-model"] == "student-small"
        )
    assert upstreams.teacher.requests and len(upstreams.teacher.requests) == 1


def test_unknown_model_in_pinning_is_a_config_error(upstreams: Upstreams) -> None:
    from pydantic import ValidationError

    from router.config import Config

    with pytest.raises(ValidationError, match="pinnable_models names unknown"):
        Config.model_validate(base_config(upstreams.urls, pinnable_models=["nope"]))


@pytest.mark.parametrize("breakage", ["keys_file", "classifier"])
def test_reload_of_a_broken_file_is_a_400(
    tmp_path: Path, upstreams: Upstreams, breakage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import CollectorRegistry

    from router.app import create_app
    from router.config import load_config
    from tests.loopback import serve

    monkeypatch.setenv("TRIAGE_TEST_ADMIN", "admin-token")
    raw = base_config(upstreams.urls)
    raw["admin"] = {"reload_endpoint": True}
    raw["auth"] = {"admin_token_env": "TRIAGE_TEST_ADMIN"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    registry = CollectorRegistry()
    app = create_app(load_config(path), registry=registry, config_path=path)
    with serve(app) as url:
        if breakage == "keys_file":
            (tmp_path / "keys").write_text("this line is not a name and a digest\n")
            raw["auth"]["keys_file"] = "keys"
        else:
            (tmp_path / "model.joblib").write_bytes(b"not a model")
            raw["classifier"] = {"kind": "learned", "path": "model.joblib"}
        path.write_text(yaml.safe_dump(raw))
        resp = httpx.post(url + "/admin/reload", headers={"authorization": "Bearer admin-token"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "invalid_config"
        assert registry.get_sample_value("triage_config_reloads_total", {"result": "rejected"}) == 1
        ok = httpx.post(url + "/v1/chat/completions", json={"model": "auto", "messages": [EASY]})
        assert ok.status_code == 200  # the old config keeps serving


def test_a_body_that_never_completes_gets_408(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["server"] = {"body_timeout_s": 0.5}
    with make_gateway(raw) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"model"'
            )
            sock.settimeout(5)
            started = time.monotonic()
            answer = sock.recv(65536)
            assert time.monotonic() - started < 3
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert gw.metric("triage_rejected_requests_total", {"code": "408"}) == 1
        assert gw.metric("triage_admitted_requests") == 0
