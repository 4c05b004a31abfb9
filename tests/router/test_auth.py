"""Client keys, per-key limits and the tokens that guard /metrics and admin endpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.conftest import GatewayFactory, Upstreams, base_config


@pytest.fixture
def keys_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRIAGE_TEST_KEYS", "alice:sk-alice,bob:sk-bob")
    monkeypatch.setenv("TRIAGE_TEST_METRICS", "metrics-secret")
    yield


def post(url: str, key: str | None, **body: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(url + "/v1/chat/completions", json=payload, headers=headers)


def test_keys_required_and_checked(
    keys_env: None, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS", "metrics_token_env": "TRIAGE_TEST_METRICS"}
    with make_gateway(raw) as gw:
        missing = post(gw.url, None)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = post(gw.url, "sk-mallory")
        assert wrong.status_code == 401
        assert "sk-mallory" not in wrong.text
        assert post(gw.url, "sk-alice").status_code == 200
        # The official SDK sees an AuthenticationError.
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        ok = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-bob", max_retries=0)
        assert "auto" in {m.id for m in ok.models.list()}
        # The client's key is never forwarded upstream.
        assert "authorization" not in upstreams.small.headers[-1]
        # /metrics has its own token, and no key value ever appears in it.
        assert httpx.get(gw.url + "/metrics").status_code == 401
        text = httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer metrics-secret"}).text
        assert 'triage_key_cost_usd_total{key="alice"}' in text
        assert "sk-alice" not in text and "sk-bob" not in text


def test_hashed_keys_file(upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-from-file").hexdigest()
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# name sha256\nci-bot {digest}\n")
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_file": str(keys)}
    with make_gateway(raw) as gw:
        assert post(gw.url, "sk-from-file").status_code == 200
        assert post(gw.url, digest).status_code == 401  # the digest itself is not a key


def test_requests_per_minute(keys_env: None, upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS", "limits": {"requests_per_minute": 3}}
    with make_gateway(raw) as gw:
        codes = [post(gw.url, "sk-alice").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = post(gw.url, "sk-alice")
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert limited.json()["error"]["code"] == "requests_per_minute"
        assert 1 <= int(limited.headers["retry-after"]) <= 20
        # Limits are per key: bob is unaffected.
        assert post(gw.url, "sk-bob").status_code == 200
        assert gw.metric("triage_rate_limited_total", {"key": "alice", "limit": "requests_per_minute"}) == 2


def test_tokens_per_minute_and_budget(
    keys_env: None, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    upstreams.small.prompt_tokens = 100  # each answer uses 105 tokens
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS", "limits": {"tokens_per_minute": 150}}
    with make_gateway(raw) as gw:
        assert post(gw.url, "sk-alice").status_code == 200
        assert post(gw.url, "sk-alice").status_code == 200  # 45 left: admitted, then overdrawn
        over = post(gw.url, "sk-alice")
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "tokens_per_minute"
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS", "limits": {"budget_usd": 0.00002}}
    with make_gateway(raw) as gw:
        # student-small: 100 x $0.1/M + 5 x $0.2/M = $0.000011 per request
        assert post(gw.url, "sk-bob").status_code == 200
        assert post(gw.url, "sk-bob").status_code == 200
        spent = post(gw.url, "sk-bob")
        assert spent.status_code == 429
        assert spent.json()["error"]["code"] == "budget_exceeded"
        assert "retry-after" not in spent.headers


def test_upstream_key_is_sent_upstream_and_nowhere_else(
    upstreams: Upstreams,
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TRIAGE_TEST_UPSTREAM_KEY", "sk-upstream-secret")
    raw = base_config(upstreams.urls)
    raw["models"][2]["api_key_env"] = "TRIAGE_TEST_UPSTREAM_KEY"
    with make_gateway(raw) as gw:
        resp = post(gw.url, "client-key", model="teacher")
        assert resp.status_code == 200
        # The configured key goes upstream in place of the client's.
        assert upstreams.teacher.headers[-1]["authorization"] == "Bearer sk-upstream-secret"
        # The upstream rejects the key: its error is passed through, the key is not echoed.
        upstreams.teacher.mode = "status"
        upstreams.teacher.status = 401
        denied = post(gw.url, None, model="teacher")
        assert denied.status_code == 401
        seen = [
            denied.text,
            str(denied.headers),
            resp.text,
            str(resp.headers),
            httpx.get(gw.url + "/v1/models").text,
            httpx.get(gw.url + "/metrics").text,
            httpx.get(gw.url + "/openapi.json").text,
            caplog.text,
        ]
        assert not any("sk-upstream-secret" in text for text in seen)
