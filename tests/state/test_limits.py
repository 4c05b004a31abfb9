"""Key limits and spend in Redis: one limit for every process and worker, budgets across restarts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from router.limits import CHARGE_DELAY_S
from tests.conftest import GatewayFactory, Upstreams
from tests.loopback import triage_process
from tests.state.conftest import BODY, COST, LEASE_S, RedisServer, shared


def post(url: str, key: str = "sk-alice") -> httpx.Response:
    # A new connection each time, so the kernel spreads requests over a server's workers.
    return httpx.post(
        url + "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_two_servers_with_two_workers_share_one_limit_exactly(
    redis_server: RedisServer, upstreams: Upstreams, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(shared(upstreams, {"requests_per_minute": 5})))
    with ExitStack() as stack:
        urls = [stack.enter_context(triage_process(cfg, "--workers", "2")).url for _ in range(2)]
        # One more request refills in 12 s; 14 requests take well under that.
        codes = [post(urls[i % 2]).status_code for i in range(14)]
        assert sorted(codes) == [200] * 5 + [429] * 9, codes
        limited = post(urls[0])
        assert limited.json()["error"]["code"] == "requests_per_minute"
        assert 1 <= int(limited.headers["retry-after"]) <= 12
        # Another key has its own limit.
        assert post(urls[1], "sk-bob").status_code == 200


def test_leases_never_admit_more_than_the_limit(
    redis_server: RedisServer, upstreams: Upstreams, tmp_path: Path
) -> None:
    """Four processes admit from leases (5% of 120 a minute: 6 requests at a time) without a
    round trip each, and together never more than the limit."""
    cfg = tmp_path / "config.yaml"
    # A timeout no busy test machine reaches: a skipped Redis would admit unchecked (fail_open).
    state = {"lease_fraction": 0.05, "timeout_s": 5}
    cfg.write_text(yaml.safe_dump(shared(upstreams, {"requests_per_minute": 120}, **state)))
    with ExitStack() as stack:
        urls = [stack.enter_context(triage_process(cfg, "--workers", "2")).url for _ in range(2)]
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: post(urls[i % 2]).status_code, range(300)))
        elapsed = time.monotonic() - started
    assert set(codes) == {200, 429}
    admitted = codes.count(200)
    # The bucket holds 120 and refills 2 a second while the requests go.
    assert admitted <= 120 + 2 * elapsed, (admitted, elapsed)
    # What leases cost: requests one process holds unused are not there for the others,
    # at most a lease (6) per process (4).
    assert admitted >= 120 - 4 * 6, (admitted, elapsed)


def test_unused_leased_requests_go_back_when_the_lease_goes_stale_and_at_shutdown(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    # 1,000 a minute (60 ms a request), 5% a lease: the first request reserves 50 (3 s of the
    # bucket) and uses one; the other 49 must not stay out of the other replicas' reach.
    raw = shared(upstreams, {"requests_per_minute": 1000}, lease_fraction=0.05, timeout_s=5)
    held = "triage:limits:alice:requests"
    with make_gateway(raw) as gw:
        assert post(gw.url).status_code == 200
        assert int(redis_server.command("PTTL", held)) > 2000  # the lease is out
        time.sleep(LEASE_S + CHARGE_DELAY_S + 0.2)  # stale, and its give-back sent
        assert int(redis_server.command("PTTL", held)) <= 60  # what the one request used
        for _ in range(3):
            assert post(gw.url).status_code == 200
        assert int(redis_server.command("PTTL", held)) > 2000
    # Stopped within the lease's time: it went back at shutdown.
    assert int(redis_server.command("PTTL", held)) <= 3 * 60


def test_tokens_charged_on_one_gateway_limit_the_other(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    upstreams.small.prompt_tokens = 100  # 105 tokens an answer
    raw = shared(upstreams, {"tokens_per_minute": 150})
    cost = (100 * 0.1 + 5 * 0.2) / 1e6
    with make_gateway(raw) as a, make_gateway(raw) as b:
        assert post(a.url).status_code == 200
        redis_server.spent("alice", cost)
        assert post(b.url).status_code == 200  # 45 tokens left: admitted, then overdrawn
        redis_server.spent("alice", 2 * cost)
        over = post(a.url)
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "tokens_per_minute"
        assert b.metric("triage_rate_limited_total", {"key": "alice", "limit": "tokens_per_minute"}) == 0
        assert a.metric("triage_rate_limited_total", {"key": "alice", "limit": "tokens_per_minute"}) == 1
    assert float(redis_server.command("GET", "triage:spend:alice")) == pytest.approx(2 * cost)


def test_budget_survives_a_restart_of_every_gateway(
    redis_server: RedisServer, upstreams: Upstreams, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(shared(upstreams, {"budget_usd": 3.5 * COST}, key_prefix="t1:")))
    with ExitStack() as stack:
        urls = [stack.enter_context(triage_process(cfg)).url for _ in range(2)]
        # Four answers fit under the budget's line (the fourth crosses it); the fifth is refused.
        codes = []
        for i in range(5):
            codes.append(post(urls[i % 2]).status_code)
            redis_server.spent("alice", min(i + 1, 4) * COST, prefix="t1:")
        assert codes == [200] * 4 + [429]
    assert float(redis_server.command("GET", "t1:spend:alice")) == pytest.approx(4 * COST)
    with ExitStack() as stack:
        urls = [stack.enter_context(triage_process(cfg)).url for _ in range(2)]
        for url in urls:
            spent = post(url)
            assert spent.status_code == 429
            assert spent.json()["error"]["code"] == "budget_exceeded"
            assert "retry-after" not in spent.headers
        assert post(urls[0], "sk-bob").status_code == 200


def test_without_state_every_process_grants_the_whole_limit(upstreams: Upstreams, tmp_path: Path) -> None:
    """The embedded default, for contrast: the same 14 requests, limits per process."""
    raw = shared(upstreams, {"requests_per_minute": 5})
    del raw["state"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with ExitStack() as stack:
        urls = [stack.enter_context(triage_process(cfg)).url for _ in range(2)]
        codes = [post(urls[i % 2]).status_code for i in range(14)]
        assert codes.count(200) == 10


def test_streams_and_count_tokens_count_against_the_shared_limits(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = shared(upstreams, {"requests_per_minute": 3, "budget_usd": 1})
    headers = {"authorization": "Bearer sk-alice"}
    with make_gateway(raw) as a, make_gateway(raw) as b:
        stream = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", a.url + "/v1/chat/completions", json=stream, headers=headers) as resp:
            assert resp.status_code == 200
            assert "data: [DONE]" in resp.read().decode()
        # The streamed answer's usage is charged like a JSON one.
        assert redis_server.spent("alice", COST) == pytest.approx(COST)
        count = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        counted = httpx.post(
            b.url + "/v1/messages/count_tokens", json=count, headers={"x-api-key": "sk-alice"}
        )
        assert counted.status_code == 200
        assert post(b.url).status_code == 200
        refused = post(a.url)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "requests_per_minute"
