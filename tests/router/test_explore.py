"""Exploration: teacher-served requests also asked of the student next in line, off the request path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai

from classifiers import learn as L
from router.store import read_traffic
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config

HARD = "Prove, step by step, that the square root of 2 is irrational; then derive a bound. " * 3


def _config(urls: dict[str, str], explore_rate: float, data_dir: Path) -> dict[str, Any]:
    raw = base_config(urls, explore_rate=explore_rate)
    raw["store"] = {"kind": "sqlite", "data_dir": str(data_dir), "flush_interval_s": 0.05}
    raw["capture"] = {"enabled": True, "sample_rate": 0.0, "labelled": True}
    return raw


def _ask(gw: Gateway) -> tuple[str, dict[str, str]]:
    """One non-streamed and one streamed hard request; the answers and the routing headers."""
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": HARD}]},
        headers={"x-request-id": "plain"},
    )
    assert resp.status_code == 200
    headers = {k: v for k, v in resp.headers.items() if k.startswith("x-triage-")}
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": HARD}],
        stream=True,
        extra_headers={"x-request-id": "streamed"},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return resp.json()["choices"][0]["message"]["content"] + "|" + streamed, headers


def _wait_for_shadows(gw: Gateway, n: int) -> None:
    compared = {"model": "student-large", "outcome": "compared"}
    deadline = time.monotonic() + 5
    while gw.metric("triage_shadow_requests_total", compared) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_explored_teacher_answers_become_shadow_records_for_the_next_student(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    upstreams.teacher.text = "The answer is 42."
    upstreams.large.text = "The answer is 41."
    with make_gateway(_config(upstreams.urls, 1.0, tmp_path / "on")) as gw:
        explored_answers, explored_headers = _ask(gw)
        _wait_for_shadows(gw, 2)
        # The student's call is shadow spend, by student, never served spend.
        assert gw.metric("triage_shadow_cost_usd_total", {"model": "student-large"}) > 0
        assert gw.metric("triage_cost_usd_total", {"model": "student-large"}) == 0
    # Asked: the highest-threshold student able to take it (student-large), not student-small.
    assert len(upstreams.large.requests) == 2 and not upstreams.small.requests
    assert gw.config.store is not None
    stored = list(read_traffic(gw.config.store))
    assert {r.request_id for r in stored} == {"plain", "streamed"}
    for record in stored:
        assert record.model == "teacher" and record.shadowed
        assert record.captured and record.prompt == HARD  # capture.labelled keeps explored prompts
        (shadow,) = record.shadows
        assert (shadow.student, shadow.agreement) == ("student-large", 0.0)
    # `triage learn` labels them like any shadow comparison: the student got it wrong.
    examples, _ = L.label_traffic(((r, r.shadows) for r in stored), L.LabelRule(student="student-large"))
    assert sorted((e.request_id, e.label, e.why) for e in examples) == [
        ("plain", 1, "shadow"),
        ("streamed", 1, "shadow"),
    ]

    upstreams.large.requests.clear()
    with make_gateway(_config(upstreams.urls, 0.0, tmp_path / "off")) as gw:
        answers, headers = _ask(gw)
        time.sleep(0.3)  # an exploration, were one started, would run after the answer
    assert not upstreams.large.requests
    assert gw.config.store is not None
    stored = list(read_traffic(gw.config.store))
    assert len(stored) == 2
    assert all(not r.shadowed and not r.shadows and r.prompt is None for r in stored)
    # The client sees the same answer and headers either way.
    assert (explored_answers, explored_headers) == (answers, headers)
    assert headers["x-triage-model"] == "teacher"
    assert [a.strip() for a in answers.split("|")] == ["The answer is 42.", "The answer is 42."]
