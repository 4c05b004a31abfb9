"""Overload: 1,000 concurrent requests to a slow but healthy student through a real `triage serve`.

The student answers every request in 2 s and its pool holds 200 connections, so
most requests wait for a connection. Waiting is not an upstream failure: every
request is answered by the student (or, past the admission limit, gets the
documented 503 `overloaded` with Retry-After); none gets a 504, no breaker opens
and the teacher is never asked.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import httpx2 as httpx
import pytest
import yaml

from tests.conftest import Upstreams, base_config
from tests.loopback import triage_process

CONCURRENT = 1_000


async def _burst(url: str, n: int) -> list[tuple[int, str | None, str | None]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, str | None, str | None]:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status, resp.headers.get("x-triage-model"), resp.headers.get("retry-after")

        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.slow
def test_slow_healthy_student_under_1000_concurrent(upstreams: Upstreams, tmp_path: Path) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0].update(read_timeout_s=10, connect_timeout_s=2, max_connections=200)
    upstreams.small.delay_s = 2.0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    with triage_process(config) as served:
        results = asyncio.run(_burst(served.url, CONCURRENT))
        metrics = httpx.get(served.url + "/metrics").text
    outcomes = Counter((status, model) for status, model, _ in results)
    assert set(outcomes) <= {(200, "student-small"), (503, None)}, outcomes
    assert all(retry == "1" for status, _, retry in results if status == 503)
    assert outcomes[(200, "student-small")] == len(upstreams.small.requests)
    assert outcomes[(200, "student-small")] >= 0.9 * CONCURRENT, outcomes
    assert upstreams.teacher.requests == []
    for line in metrics.splitlines():
        if line.startswith(
            ("triage_upstream_errors_total{", "triage_fallbacks_total{", "triage_circuit_transitions_total{")
        ):
            assert line.endswith(" 0.0"), line
