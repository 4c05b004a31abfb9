"""Triage in front of the real local CPU models: routing, streaming and usage with real inference."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.deploy.conftest import LocalModels, sdk_client, shipped_config

pytestmark = pytest.mark.local_models

EASY = "Say hello."
HARD = (
    "Prove that for every integer n >= 1 the sum 1^3 + 2^3 + ... + n^3 equals (n(n+1)/2)^2. "
    "Derive it step by step by induction, then generalise the argument to sums of fifth powers "
    "and explain each algebraic step of the inductive case."
)


@pytest.fixture(scope="module")
def local_config(local_models: LocalModels) -> dict[str, Any]:
    """The shipped config.yaml (learned classifier, calibrated threshold), on the test's ports."""
    raw = shipped_config(local_models.student_url, local_models.teacher_url)
    student, teacher = raw["models"]
    assert student["upstream_model"] == local_models.student_model
    assert teacher["upstream_model"] == local_models.teacher_model
    return raw


@pytest.fixture
def local_gateway(local_config: dict[str, Any], make_gateway: GatewayFactory) -> Iterator[Gateway]:
    with make_gateway(local_config) as gw:
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    return sdk_client(gw.url)


def test_easy_to_student_hard_to_teacher(local_gateway: Gateway) -> None:
    c = client(local_gateway)
    for prompt, expected in ((EASY, "student-small"), (HARD, "teacher")):
        raw = c.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
        )
        completion = raw.parse()
        assert raw.headers["x-triage-model"] == expected
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens > 0
    for model in ("student-small", "teacher"):
        assert local_gateway.metric("triage_prompt_tokens_total", {"model": model, "estimated": "false"}) > 0
        assert (
            local_gateway.metric("triage_completion_tokens_total", {"model": model, "estimated": "false"}) > 0
        )
        assert local_gateway.metric("triage_cost_usd_total", {"model": model}) > 0


def test_streaming_through_triage(local_gateway: Gateway) -> None:
    c = client(local_gateway)
    for prompt, expected in ((EASY, "student-small"), (HARD, "teacher")):
        with c.chat.completions.with_streaming_response.create(
            model="auto",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            assert response.headers["x-triage-model"] == expected
            chunks = list(response.parse())
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # Streams without include_usage are counted exactly too (Triage asks for usage itself).
    stream = c.chat.completions.create(
        model="student-small",
        messages=[{"role": "user", "content": EASY}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert all(ch.usage is None for ch in stream)
    assert local_gateway.metric("triage_usage_missing_total", {"model": "student-small"}) == 0
