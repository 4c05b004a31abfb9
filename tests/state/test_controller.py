"""The share controller's window in Redis: replicas that see different traffic use one threshold."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.state.conftest import REDIS_URL_ENV, RedisServer

EASY = "thanks"  # heuristic score 0.10
HARD = (
    "Prove step by step that the sum of 1/n^2 equals pi^2/6, then write a Python function "
    "def f(x): return x**2 and explain each step; first derive, then compute 3*4+5 and 17/3 precisely."
)  # heuristic score 0.91


def threshold(gw: Gateway) -> float:
    return gw.metric("triage_score_threshold", {"model": "student-large"})


def thresholds_after_split_traffic(make_gateway: GatewayFactory, raw: dict[str, Any]) -> tuple[float, float]:
    """Gateway a sees only easy prompts, b only hard ones; each one's top threshold afterwards."""
    with make_gateway(raw) as a, make_gateway(raw) as b, httpx.Client(timeout=30) as client:
        for _ in range(60):
            for gw, text in ((a, EASY), (b, HARD)):
                body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
                assert client.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        # Updates run off the request path: wait until both have taken the last one.
        deadline = time.monotonic() + 10
        seen = (threshold(a), threshold(b))
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = (threshold(a), threshold(b))
            if now == seen:
                break
            seen = now
        return seen


def test_replicas_with_different_traffic_share_one_threshold(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls, target_student_share=0.3, share_window=50, share_update_every=5)
    alone = thresholds_after_split_traffic(make_gateway, raw)
    # Unshared, each replica aims at the quantile of its own traffic.
    assert alone[0] == pytest.approx(0.102, abs=0.01) and alone[1] == pytest.approx(0.907, abs=0.01)
    raw["state"] = {"redis_url_env": REDIS_URL_ENV}
    shared = thresholds_after_split_traffic(make_gateway, raw)
    # Shared, both aim at the 30% quantile of all traffic (half of it easy).
    assert shared[0] == pytest.approx(0.102, abs=0.01)
    assert shared[1] == pytest.approx(shared[0], abs=1e-4)
    factor = float(redis_server.command("GET", "triage:share:factor"))
    assert factor * 0.5 == pytest.approx(shared[0], abs=1e-4)
    assert int(redis_server.command("LLEN", "triage:share:window")) == 50
