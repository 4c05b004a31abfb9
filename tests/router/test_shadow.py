"""Shadow evaluation: sampling rate, concurrency cap, agreement and cost, off the request path."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx

from router.shadow import agreement
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config


def wait_for(gw: Gateway, name: str, labels: dict[str, str], value: float, timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = gw.metric(name, labels)
        if got >= value:
            return got
        time.sleep(0.02)
    return gw.metric(name, labels)


def easy(client: httpx.Client) -> httpx.Response:
    return client.post(
        "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "thanks"}]}
    )


def test_agreement() -> None:
    assert agreement("The answer is 42.", "So we get 42") == 1.0
    assert agreement("The answer is 41.", "So we get 42") == 0.0
    assert agreement("Paris is the capital", "paris is the capital") == 1.0
    assert 0 < agreement("Paris is lovely", "Paris is the capital") < 1
    assert agreement("", "something") == 0.0


def test_sampling_rate_and_cost(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.text = "the student says this"
    upstreams.teacher.text = "while the teacher says that"
    with make_gateway(base_config(upstreams.urls, shadow_rate=0.25)) as gw:
        with httpx.Client(base_url=gw.url) as client:
            for _ in range(200):
                assert easy(client).headers["x-triage-model"] == "student-small"
        compared = {"model": "student-small", "outcome": "compared"}
        time.sleep(0.5)
        n = gw.metric("triage_shadow_requests_total", compared)
        assert 25 <= n <= 75  # 200 draws at 25%: far outside this is a broken sampler
        assert len(upstreams.teacher.requests) == n
        assert gw.metric("triage_shadow_agreement_count", {"model": "student-small"}) == n
        # The answers share one word in eight: low agreement is recorded as such.
        assert gw.metric("triage_shadow_agreement_sum", {"model": "student-small"}) < n * 0.5
        assert gw.metric("triage_shadow_cost_usd_total", {"model": "student-small"}) > 0
        # Shadow spend is separate from serving spend.
        assert gw.metric("triage_cost_usd_total", {"model": "teacher"}) == 0


def test_concurrency_cap_skips_instead_of_queueing(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    upstreams.teacher.delay_s = 1.0
    raw = base_config(upstreams.urls, shadow_rate=1.0, shadow_max_concurrency=2)
    with make_gateway(raw) as gw:
        start = time.monotonic()
        with httpx.Client(base_url=gw.url) as client, ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: easy(client), range(8)))
        # The slow teacher is off the request path.
        assert time.monotonic() - start < 0.9
        assert all(r.status_code == 200 for r in responses)
        skipped = gw.metric("triage_shadow_requests_total", {"model": "student-small", "outcome": "skipped"})
        compared = wait_for(
            gw,
            "triage_shadow_requests_total",
            {"model": "student-small", "outcome": "compared"},
            2,
            timeout=3,
        )
        assert compared == 2
        assert skipped == 6
