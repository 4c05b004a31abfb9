"""Redis killed, frozen and started again under load: requests are answered as `on_failure` says,
none waits on Redis past the timeout, and no spend is lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import GatewayFactory, Upstreams
from tests.loopback import closed_port_url
from tests.state.conftest import BODY, COST, REDIS_URL_ENV, RedisServer, shared

LIMITS = {"requests_per_minute": 1_000_000, "budget_usd": 1000}


class Load:
    """Four client threads posting until stopped; every status code (or exception) kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self) -> None:
        # A hung request would raise ReadTimeout here and be kept as a failure.
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    resp = client.post(
                        self.url + "/v1/chat/completions",
                        json=BODY,
                        headers={"authorization": "Bearer sk-alice"},
                    )
                    self.results.append(
                        (resp.status_code, resp.json()["error"]["code"] if resp.is_error else None)
                    )
                except httpx.HTTPError as exc:
                    self.results.append(exc)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def while_running(self, seconds: float) -> None:
        """Let `seconds` of load pass (after its first answer)."""
        deadline = time.monotonic() + 30
        while not self.results and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.results, "the load has not started"
        time.sleep(seconds)


def through_outage(url: str, stop: Callable[[], None], resume: Callable[[], None]) -> tuple[list[Any], int]:
    """Every answer of a load run before, during and after an outage, and how many came before it."""
    with Load(url) as load:
        load.while_running(0.5)
        stop()
        before = len(load.results)
        load.while_running(1.0)
        resume()
        load.while_running(1.0)
    return list(load.results), before


def test_fail_open_serves_through_a_redis_kill_and_loses_no_spend(
    persistent_redis: RedisServer,
    upstreams: Upstreams,
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triage.state")
    raw = shared(upstreams, LIMITS, retry_s=0.2)
    with make_gateway(raw) as gw:
        results, _ = through_outage(gw.url, persistent_redis.kill, persistent_redis.start)
        assert results and all(r == (200, None) for r in results), {str(r) for r in results}
        assert gw.metric("triage_shared_state_errors_total", {"op": "limits"}) >= 1
        assert gw.metric("triage_shared_state_unchecked_requests_total", {"outcome": "served"}) >= 1
        # Served again with Redis back: limits checked, state up.
        assert gw.metric("triage_shared_state_up") == 1
    # Spend counted while Redis was down went to Redis when it came back (or at shutdown).
    spent = float(persistent_redis.command("GET", "triage:spend:alice"))
    assert spent >= len(results) * COST * (1 - 1e-9)
    assert spent == pytest.approx(len(results) * COST, rel=0.05)
    messages = [r.getMessage() for r in caplog.records if r.name == "triage.state"]
    # Ready at start, then one outage logged once each way (a restarted Redis's stale
    # connections are retried, not counted as more outages).
    assert messages == ["shared state ready", "shared state unavailable", "shared state reachable again"]


def test_fail_closed_refuses_while_redis_is_down_and_recovers(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = shared(upstreams, LIMITS, retry_s=0.2, on_failure="fail_closed")
    with make_gateway(raw) as gw:
        results, before = through_outage(gw.url, redis_server.kill, redis_server.start)
        assert not [r for r in results if isinstance(r, Exception)], results
        assert set(results) <= {(200, None), (429, "shared_state_unavailable")}
        assert all(r == (200, None) for r in results[: before - 4])  # up to one in flight per thread
        assert (429, "shared_state_unavailable") in results
        assert results[-4:] == [(200, None)] * 4  # Redis is back
        refused = gw.metric("triage_shared_state_unchecked_requests_total", {"outcome": "refused"})
        assert refused == results.count((429, "shared_state_unavailable"))
        assert (
            gw.metric("triage_rate_limited_total", {"key": "alice", "limit": "shared_state_unavailable"})
            == refused
        )


def test_a_frozen_redis_costs_each_request_at_most_the_timeout(
    redis_server: RedisServer, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = shared(upstreams, LIMITS, retry_s=0.2, timeout_s=0.05)
    with make_gateway(raw) as gw:
        results, _ = through_outage(gw.url, redis_server.freeze, redis_server.thaw)
        assert results and all(r == (200, None) for r in results), {str(r) for r in results}
        assert gw.metric("triage_shared_state_errors_total", {"op": "limits"}) >= 1
        assert gw.metric("triage_shared_state_up") == 1


def test_a_gateway_started_without_redis_says_so_and_serves(
    upstreams: Upstreams,
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(REDIS_URL_ENV, closed_port_url().replace("http://", "redis://"))
    raw = shared(upstreams, LIMITS)
    with make_gateway(raw) as gw:
        resp = httpx.post(
            gw.url + "/v1/chat/completions", json=BODY, headers={"authorization": "Bearer sk-alice"}
        )
        assert resp.status_code == 200  # fail_open
        assert gw.metric("triage_shared_state_up") == 0
        assert gw.metric("triage_shared_state_errors_total", {"op": "start"}) == 1
    warnings = [r for r in caplog.records if r.name == "triage.state" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["shared state unavailable"]
