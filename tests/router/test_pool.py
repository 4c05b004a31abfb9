"""Each model's connection pool: waiting for a connection is the gateway's queue, not an upstream failure.

Requests beyond `max_connections` wait for a slot (exported as
`triage_upstream_pool_connections{state="waiting"}`); a healthy but slow upstream
is never reported as timed out and never has its breaker opened because of it.
Past `pool_timeout_s` the client gets 503 `overloaded` with Retry-After. Every
way a request can end gives its slot back.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client import CollectorRegistry

from router.config import Config
from router.errors import Overloaded
from router.metrics import UPSTREAM_ERROR_TYPES, Metrics
from router.upstream import ModelPool, UpstreamReply, _Slots
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config

BODY = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def pool_gauge(gw: Gateway, state: str, model: str = "student-small") -> float:
    return gw.metric("triage_upstream_pool_connections", {"model": model, "state": state})


@contextmanager
def sampled(gw: Gateway, state: str) -> Iterator[list[float]]:
    """Sample a pool gauge every few milliseconds while the block runs."""
    seen: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(pool_gauge(gw, state))
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def concurrently(url: str, n: int, body: dict[str, Any] = BODY) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))

    return asyncio.run(run())


def assert_no_upstream_failure(gw: Gateway, model: str = "student-small") -> None:
    assert gw.metric("triage_circuit_state", {"model": model, "endpoint": "0"}) == 0
    assert (
        gw.metric("triage_circuit_transitions_total", {"model": model, "endpoint": "0", "state": "open"}) == 0
    )
    for type_ in UPSTREAM_ERROR_TYPES:
        assert gw.metric("triage_upstream_errors_total", {"model": model, "type": type_}) == 0, type_


def test_queueing_for_a_connection_is_not_an_upstream_failure(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    # 200 at once to a healthy student that takes 0.5 s, 20 connections: the last
    # ones wait ~4.5 s for a connection, longer than the 2 s connect timeout that
    # used to cover that wait (and turned it into 504s and an open breaker).
    raw = base_config(upstreams.urls)
    raw["models"][0].update(max_connections=20, read_timeout_s=2)
    upstreams.small.delay_s = 0.5
    with make_gateway(raw) as gw:
        with sampled(gw, "waiting") as waiting, sampled(gw, "in_use") as in_use:
            responses = concurrently(gw.url, 200)
        assert [r.status_code for r in responses] == [200] * 200
        assert {r.headers["x-triage-model"] for r in responses} == {"student-small"}
        assert len(upstreams.small.requests) == 200
        assert upstreams.teacher.requests == []
        assert_no_upstream_failure(gw)
        assert max(waiting) >= 100
        assert max(in_use) == 20
        assert pool_gauge(gw, "waiting") == 0
        assert pool_gauge(gw, "in_use") == 0
        assert gw.metric("triage_upstream_pool_timeouts_total", {"model": "student-small"}) == 0


def test_waiting_past_pool_timeout_is_503_overloaded(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0].update(max_connections=2, pool_timeout_s=0.3)
    upstreams.small.delay_s = 1.0
    with make_gateway(raw) as gw:
        responses = concurrently(gw.url, 6)
        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(served) == 2
        assert {r.headers["x-triage-model"] for r in served} == {"student-small"}
        assert len(refused) == 4
        for resp in refused:
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1"
            error = resp.json()["error"]
            assert error["code"] == "overloaded"
            assert "no free connection" in error["message"]
        # Not an upstream failure: no fallback to the teacher, no breaker.
        assert upstreams.teacher.requests == []
        assert len(upstreams.small.requests) == 2
        assert_no_upstream_failure(gw)
        assert gw.metric("triage_upstream_pool_timeouts_total", {"model": "student-small"}) == 4
        assert pool_gauge(gw, "waiting") == 0
        assert pool_gauge(gw, "in_use") == 0


def test_a_stream_holds_its_slot_until_it_ends(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0].update(max_connections=1, pool_timeout_s=5)
    upstreams.small.chunks = 20
    upstreams.small.chunk_delay_s = 0.05
    with make_gateway(raw) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert pool_gauge(gw, "in_use") == 1
            for _ in lines:
                pass
        wait_for(lambda: pool_gauge(gw, "in_use") == 0)
        # The one slot is free again: the next request is served without waiting.
        upstreams.small.chunk_delay_s = 0
        assert client.post("/v1/chat/completions", json=BODY).headers["x-triage-model"] == "student-small"


def test_a_client_that_leaves_mid_stream_frees_the_slot(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0].update(max_connections=1, pool_timeout_s=0.5)
    upstreams.small.chunks = 200
    upstreams.small.chunk_delay_s = 0.05  # 10 s of stream
    with make_gateway(raw) as gw:
        for _ in range(3):
            with (
                httpx.Client(base_url=gw.url, timeout=10) as client,
                client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as resp,
            ):
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        assert pool_gauge(gw, "in_use") == 1
                        break  # the client hangs up here, mid-stream
            wait_for(lambda: pool_gauge(gw, "in_use") == 0)
        upstreams.small.chunks = 3
        upstreams.small.chunk_delay_s = 0
        resp = httpx.post(gw.url + "/v1/chat/completions", json=BODY)
        assert resp.headers["x-triage-model"] == "student-small"
        assert_no_upstream_failure(gw)


@pytest.mark.parametrize(
    ("mode", "stream"),
    [
        ("status", False),
        ("malformed", False),
        ("status", True),
        ("malformed", True),
        ("stream_error", True),
        ("cut_stream", True),
    ],
)
def test_failed_attempts_give_their_slot_back(
    upstreams: Upstreams, make_gateway: GatewayFactory, mode: Any, stream: bool
) -> None:
    raw = base_config(upstreams.urls, breaker_failures=1000)
    raw["models"][0].update(max_connections=1, pool_timeout_s=0.5)
    upstreams.small.mode = mode
    upstreams.small.chunks = 4
    with make_gateway(raw) as gw:
        for _ in range(4):
            resp = httpx.post(gw.url + "/v1/chat/completions", json={**BODY, "stream": stream}, timeout=10)
            assert resp.status_code == 200
            assert resp.headers["x-triage-model"] == "teacher"
        # A stream gives its slot back just after its last byte reaches the client.
        wait_for(lambda: pool_gauge(gw, "in_use") == 0 and pool_gauge(gw, "in_use", "teacher") == 0)
        assert pool_gauge(gw, "in_use", "teacher") == 0
        assert gw.metric("triage_upstream_pool_timeouts_total", {"model": "student-small"}) == 0


def wait_for(condition: Any, timeout_s: float = 3) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- the pool on its own: cancellation, time-outs, dropped streams ------------------------------


def model_pool(upstreams: Upstreams, max_connections: int, pool_timeout_s: float = 5) -> ModelPool:
    raw = base_config(upstreams.urls)
    raw["models"][0].update(max_connections=max_connections, pool_timeout_s=pool_timeout_s)
    model = Config.model_validate(raw).models[0]
    return ModelPool(model, 1.0, 3, metrics=Metrics(CollectorRegistry()))


def test_cancelled_waiters_and_time_outs_lose_no_slot(upstreams: Upstreams) -> None:
    upstreams.small.delay_s = 0.3
    body = b'{"model": "up-small", "messages": [{"role": "user", "content": "hi"}]}'

    async def run(pool: ModelPool) -> None:
        async def post(wait: bool = True) -> UpstreamReply:
            return await pool.post(0, "/chat/completions", body, "r", wait=wait)

        try:
            busy = [asyncio.create_task(post()) for _ in range(2)]
            await asyncio.sleep(0.05)
            assert (pool.in_use, pool.waiting) == (2, 0)
            if pool.model.pool_timeout_s < 1:
                # Waiters that are cancelled, and waiters that time out, leave no trace.
                cancelled = [asyncio.create_task(post()) for _ in range(3)]
                timed_out = [asyncio.create_task(post()) for _ in range(3)]
                await asyncio.sleep(0.05)
                assert pool.waiting == 6
                for task in cancelled:
                    task.cancel()
                for task in timed_out:
                    with pytest.raises(Overloaded):
                        await task
                assert all(task.cancelled() for task in cancelled)
                assert pool.waiting == 0
            else:
                # A request cancelled once it has its slot (in flight) gives it back.
                first = asyncio.create_task(post())
                second = asyncio.create_task(post())
                await asyncio.sleep(0.01)
                assert pool.waiting == 2
                await busy[0]
                first.cancel()
                assert (await second).status_code == 200
                assert first.cancelled()
                # Without waiting: refused at once when full.
                await asyncio.gather(*busy)
                busy = [asyncio.create_task(post()) for _ in range(2)]
                await asyncio.sleep(0.05)
                with pytest.raises(Overloaded, match="no free connection; retry"):
                    await post(wait=False)
            assert [reply.status_code for reply in await asyncio.gather(*busy)] == [200] * len(busy)
            assert (pool.in_use, pool.waiting) == (0, 0)
        finally:
            await pool.aclose()

    asyncio.run(run(model_pool(upstreams, 2, pool_timeout_s=0.2)))
    asyncio.run(run(model_pool(upstreams, 2, pool_timeout_s=5)))


def test_a_slot_handed_to_a_cancelled_waiter_passes_on() -> None:
    async def run() -> None:
        slots = _Slots(1, None, None)
        assert await slots.acquire(None)
        assert not await slots.acquire(None)  # full, and told not to wait
        first = asyncio.create_task(slots.acquire(5))
        second = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        slots.release()  # handed to `first`...
        first.cancel()  # ...which is cancelled before it could run
        assert await second
        assert first.cancelled()
        assert (slots.in_use, slots.waiting) == (1, 0)
        slots.release()
        assert (slots.in_use, slots.waiting) == (0, 0)
        # A cancelled waiter whose task has not run yet does not block a newcomer.
        assert await slots.acquire(None)
        third = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        third.cancel()
        slots.release()
        assert await slots.acquire(None)
        await asyncio.sleep(0)  # the cancelled waiter's task runs and leaves the count
        assert (slots.in_use, slots.waiting) == (1, 0)

    asyncio.run(run())


def test_a_dropped_stream_gives_its_slot_back(upstreams: Upstreams) -> None:
    upstreams.small.chunks = 50
    upstreams.small.chunk_delay_s = 0.02

    async def run() -> None:
        pool = model_pool(upstreams, 1)
        body = b'{"model": "up-small", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
        try:
            stream = await pool.open_stream(0, "/chat/completions", body, "r")
            assert await stream.next_event()
            assert pool.in_use == 1
            await stream.aclose()
            await stream.aclose()  # closing twice gives back one slot
            assert pool.in_use == 0
            # A stream nobody closes (a bug elsewhere) is released when collected.
            stream = await pool.open_stream(0, "/chat/completions", body, "r")
            assert pool.in_use == 1
            del stream
            gc.collect()
            await asyncio.sleep(0.01)
            assert pool.in_use == 0
            stream = await pool.open_stream(0, "/chat/completions", body, "r")
            await stream.aclose()
        finally:
            await pool.aclose()

    asyncio.run(run())
