"""Requests are counted by the API the client spoke, whatever model answered."""

from __future__ import annotations

import httpx2 as httpx

from tests.conftest import GatewayFactory, Upstreams, base_config

ASK = [{"role": "user", "content": "hello"}]


def test_each_api_is_counted_under_its_own_name(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"].append(
        {
            "name": "embedder",
            "role": "embedding",
            "endpoints": [upstreams.urls["large"] + "/v1"],
            "upstream_model": "e",
        }
    )
    bodies = {
        "chat": ("/v1/chat/completions", {"model": "auto", "messages": ASK}),
        "completions": ("/v1/completions", {"model": "auto", "prompt": "hello"}),
        "responses": ("/v1/responses", {"model": "auto", "input": "hello"}),
        "messages": ("/v1/messages", {"model": "auto", "max_tokens": 16, "messages": ASK}),
        "embeddings": ("/v1/embeddings", {"model": "auto", "input": "hello"}),
    }
    with make_gateway(raw) as gw:
        for api, (path, body) in bodies.items():
            for _ in range(2 if api == "messages" else 1):
                assert httpx.post(gw.url + path, json=body, timeout=10).status_code == 200, api
        missing = {"model": "nope", "max_tokens": 16, "messages": ASK}
        assert httpx.post(gw.url + "/v1/messages", json=missing, timeout=10).status_code == 404
        counts = {
            api: gw.metric("triage_api_requests_total", {"api": api, "status_class": "2xx"}) for api in bodies
        }
    assert counts == {"chat": 1, "completions": 1, "responses": 1, "messages": 2, "embeddings": 1}
    # A request refused before routing is counted as rejected, not as answered.
    assert gw.metric("triage_api_requests_total", {"api": "messages", "status_class": "4xx"}) == 0
