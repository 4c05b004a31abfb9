"""Exact token, cost and counterfactual counters after known traffic through a real gateway.

Prices (USD per million tokens, `tests/conftest.py::base_config`):
student-small 0.1 / 0.2, student-large 0.3 / 0.6, teacher 3.0 / 15.0 (input / output).
The fakes report 200,000 prompt tokens so every answer is worth whole cents.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import httpx2 as httpx
import pytest

from router import stats
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import closed_port_url

EASY = "thanks!"
HARD = (
    "Prove that the sum of the first n odd numbers equals n^2, step by step, then derive "
    "the closed form of sum k^3 and explain why the induction works. Analyze edge cases. "
    "```python\ndef f(n):\n    return n\n```"
)
PROMPT = 200_000
COMPLETION = 1_000
PRICES = {"student-small": (0.1, 0.2), "student-large": (0.3, 0.6), "teacher": (3.0, 15.0)}


def usd(model: str, prompt: int = PROMPT, completion: int = COMPLETION) -> float:
    """What `prompt`/`completion` tokens cost at `model`'s prices."""
    pin, pout = PRICES[model]
    return (prompt * pin + completion * pout) / 1e6


def chat(gw: Gateway, content: str, model: str = "auto", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)


def stream(gw: Gateway, content: str, **extra: Any) -> list[str]:
    """Stream a chat completion; return its `data:` payloads."""
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], "stream": True, **extra}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        return [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]


def big_usage(upstreams: Upstreams, completion: int = COMPLETION) -> None:
    for state in (upstreams.small, upstreams.large, upstreams.teacher):
        state.prompt_tokens = PROMPT
        state.chunks = completion


def mixed_workload(gw: Gateway, upstreams: Upstreams) -> None:
    """3 easy (student-small), 2 hard (teacher), 1 pinned to student-large; all non-streaming."""
    big_usage(upstreams)
    served = [chat(gw, EASY).headers["x-triage-model"] for _ in range(3)]
    served += [chat(gw, HARD).headers["x-triage-model"] for _ in range(2)]
    served.append(chat(gw, HARD, model="student-large").headers["x-triage-model"])
    assert served == ["student-small"] * 3 + ["teacher"] * 2 + ["student-large"]


def test_tokens_cost_and_counterfactual_are_exact(gateway: Gateway, upstreams: Upstreams) -> None:
    mixed_workload(gateway, upstreams)
    served = {"student-small": 3, "teacher": 2, "student-large": 1}
    for model, n in served.items():
        assert (
            gateway.metric("triage_prompt_tokens_total", {"model": model, "estimated": "false"}) == n * PROMPT
        )
        assert (
            gateway.metric("triage_completion_tokens_total", {"model": model, "estimated": "false"})
            == n * COMPLETION
        )
        assert gateway.metric("triage_prompt_tokens_total", {"model": model, "estimated": "true"}) == 0
        assert gateway.metric("triage_cost_usd_total", {"model": model}) == pytest.approx(n * usd(model))
        assert gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": model}) == pytest.approx(
            n * usd("teacher")
        )
    # To the cent: 3 × $0.0202 + $0.0606 + 2 × $0.615 = $1.3512 spent; 6 × $0.615 = $3.69 teacher-only.
    cost = sum(gateway.metric("triage_cost_usd_total", {"model": m}) for m in PRICES)
    equiv = sum(gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": m}) for m in PRICES)
    assert round(cost, 4) == 1.3512
    assert round(equiv, 2) == 3.69
    assert round(equiv - cost, 4) == 2.3388
    assert round(100 * (equiv - cost) / equiv, 2) == 63.38
    assert gateway.metric("triage_usage_missing_total", {"model": "student-small"}) == 0


def test_requests_by_reason_and_status_class(gateway: Gateway, upstreams: Upstreams) -> None:
    mixed_workload(gateway, upstreams)
    upstreams.small.mode = "status"
    upstreams.small.status = 422  # a client error: passed through, no fallback
    assert chat(gateway, EASY, model="student-small").status_code == 422
    upstreams.teacher.mode = "status"
    upstreams.teacher.status = 503  # the teacher has nowhere to fall back to
    assert chat(gateway, HARD).status_code == 503

    def requests(model: str, reason: str, status: str) -> float:
        return gateway.metric(
            "triage_requests_total", {"model": model, "reason": reason, "status_class": status}
        )

    assert requests("student-small", "classifier", "2xx") == 3
    assert requests("teacher", "classifier", "2xx") == 2
    assert requests("student-large", "pinned", "2xx") == 1
    assert requests("student-small", "pinned", "4xx") == 1
    assert requests("teacher", "classifier", "5xx") == 1
    all_requests = sum(
        s.value
        for f in gateway.registry.collect()
        if f.name == "triage_requests"
        for s in f.samples
        if s.name == "triage_requests_total"
    )
    assert all_requests == 8
    assert gateway.metric("triage_routing_decisions_total", {"model": "teacher", "reason": "classifier"}) == 3
    # Failed attempts are not billed: no usage came back.
    assert gateway.metric("triage_cost_usd_total", {"model": "teacher"}) == pytest.approx(2 * usd("teacher"))
    assert gateway.metric("triage_upstream_errors_total", {"model": "teacher", "type": "status"}) == 1
    assert gateway.metric("triage_upstream_errors_total", {"model": "student-small", "type": "status"}) == 1


def test_http_error_on_student_falls_back_and_bills_only_the_teacher(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    big_usage(upstreams)
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    resp = chat(gateway, EASY)
    assert resp.status_code == 200
    assert resp.headers["x-triage-model"] == "teacher"
    assert resp.headers["x-triage-reason"] == "fallback"
    assert len(upstreams.small.requests) == 1 and len(upstreams.teacher.requests) == 1

    assert (
        gateway.metric("triage_fallbacks_total", {"model": "student-small", "reason": "upstream_error"}) == 1
    )
    assert gateway.metric("triage_upstream_errors_total", {"model": "student-small", "type": "status"}) == 1
    assert (
        gateway.metric(
            "triage_requests_total", {"model": "teacher", "reason": "fallback", "status_class": "2xx"}
        )
        == 1
    )
    assert (
        gateway.metric(
            "triage_requests_total", {"model": "student-small", "reason": "classifier", "status_class": "5xx"}
        )
        == 0
    )
    # The student answered with an error and no usage: it cost nothing.
    assert gateway.metric("triage_cost_usd_total", {"model": "student-small"}) == 0
    assert gateway.metric("triage_prompt_tokens_total", {"model": "student-small", "estimated": "false"}) == 0
    assert gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": "student-small"}) == 0
    # The teacher served it at teacher prices: $0.615, and nothing was saved.
    cost = gateway.metric("triage_cost_usd_total", {"model": "teacher"})
    equiv = gateway.metric("triage_teacher_equivalent_cost_usd_total", {"model": "teacher"})
    assert round(cost, 3) == 0.615
    assert cost == pytest.approx(equiv)


def test_dead_student_counts_timeouts_and_unavailable_as_upstream_error(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1"]
    with make_gateway(raw) as gw:
        big_usage(upstreams)
        assert chat(gw, EASY).headers["x-triage-model"] == "teacher"
        assert (
            gw.metric("triage_upstream_errors_total", {"model": "student-small", "type": "unavailable"}) == 1
        )
        assert (
            gw.metric("triage_fallbacks_total", {"model": "student-small", "reason": "upstream_error"}) == 1
        )
        assert gw.metric("triage_cost_usd_total", {"model": "student-small"}) == 0
        assert gw.metric("triage_cost_usd_total", {"model": "teacher"}) == pytest.approx(usd("teacher"))


def test_streaming_usage_is_counted_and_hidden_unless_asked(gateway: Gateway, upstreams: Upstreams) -> None:
    big_usage(upstreams, completion=20)
    events = stream(gateway, EASY)
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e for e in events)  # the gateway asked for usage, not the client
    events = stream(gateway, EASY, stream_options={"include_usage": True})
    assert any('"prompt_tokens":200000' in e.replace(" ", "") for e in events)

    assert (
        gateway.metric("triage_prompt_tokens_total", {"model": "student-small", "estimated": "false"})
        == 2 * PROMPT
    )
    assert (
        gateway.metric("triage_completion_tokens_total", {"model": "student-small", "estimated": "false"})
        == 40
    )
    assert gateway.metric("triage_cost_usd_total", {"model": "student-small"}) == pytest.approx(
        2 * usd("student-small", completion=20)
    )
    assert gateway.metric(
        "triage_teacher_equivalent_cost_usd_total", {"model": "student-small"}
    ) == pytest.approx(2 * usd("teacher", completion=20))
    assert (
        gateway.metric(
            "triage_requests_total", {"model": "student-small", "reason": "classifier", "status_class": "2xx"}
        )
        == 2
    )
    assert gateway.metric("triage_time_to_first_token_seconds_count", {"model": "student-small"}) == 2
    assert gateway.metric("triage_request_duration_seconds_count", {"model": "student-small"}) == 2


def test_stream_without_usage_is_estimated_and_flagged(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.small.mode = "no_usage"
    upstreams.small.chunks = 7
    stream(gateway, EASY)
    assert gateway.metric("triage_usage_missing_total", {"model": "student-small"}) == 1
    # One event per token: 7 content chunks (the finish chunk and [DONE] are not tokens).
    assert (
        gateway.metric("triage_completion_tokens_total", {"model": "student-small", "estimated": "true"}) == 7
    )
    # ceil(7 characters / 4 characters per token).
    assert gateway.metric("triage_prompt_tokens_total", {"model": "student-small", "estimated": "true"}) == 2
    assert gateway.metric("triage_prompt_tokens_total", {"model": "student-small", "estimated": "false"}) == 0


def test_histogram_quantile_matches_promql_interpolation() -> None:
    buckets = [(0.5, 1.0), (1.0, 3.0), (2.0, 4.0), (math.inf, 4.0)]
    assert stats.histogram_quantile(0.5, buckets) == pytest.approx(0.75)
    assert stats.histogram_quantile(0.25, buckets) == pytest.approx(0.5)
    assert stats.histogram_quantile(0.95, buckets) == pytest.approx(1.8)
    # Ranks in +Inf return the highest finite bound; empty histograms give nothing.
    assert stats.histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0
    assert stats.histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_stats_cli_reports_the_known_workload(
    gateway: Gateway, upstreams: Upstreams, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed_workload(gateway, upstreams)
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    assert chat(gateway, EASY).headers["x-triage-reason"] == "fallback"

    parser = argparse.ArgumentParser(prog="triage")
    stats.add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stats", "--url", gateway.url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out[: out.index("latency (s)")].splitlines()

    def row(prefix: str) -> list[str]:
        found = [line.split() for line in lines if line.startswith(prefix)]
        assert len(found) == 1, out
        return found[0]

    # model requests share 2xx 4xx 5xx spend teacher-only
    assert row("student-small ") == ["student-small", "3", "42.9%", "3", "0", "0", "$0.0606", "$1.8450"]
    assert row("teacher ") == ["teacher", "3", "42.9%", "3", "0", "0", "$1.8450", "$1.8450", "(teacher)"]
    assert row("student-large ") == ["student-large", "1", "14.3%", "1", "0", "0", "$0.0606", "$0.6150"]
    assert row("all ") == ["all", "7", "100.0%", "7", "0", "0", "$1.9662", "$4.3050"]
    # 4 of 7 served by students; of the 5 classifier-routed, 3 went to students.
    assert "Student share     57.1% of all requests, 60.0% of classifier-routed" in out
    assert "Spend             $1.9662 actual vs $4.3050 teacher-only" in out
    assert "Savings           $2.3388 (54.3%)" in out
    assert "Fallbacks         1 (upstream_error 1) = 14.3% of requests" in out
    assert "Upstream errors   1 (student-small status 1)" in out
    assert "Gateway overhead  p50 " in out and " ms, p99 " in out


def test_stats_cli_latency_rows(
    gateway: Gateway, upstreams: Upstreams, capsys: pytest.CaptureFixture[str]
) -> None:
    stream(gateway, EASY)
    assert stats.run(gateway.url) == 0
    out = capsys.readouterr().out
    table = out[out.index("latency (s)") :].splitlines()
    small = next(line.split() for line in table if line.startswith("student-small"))
    # p50 and p95 total time, then TTFT: streamed once, so all four exist and sit in (0, 0.05].
    assert len(small) == 5
    assert all(0 < float(x) <= 0.05 for x in small[1:])
    large = next(line.split() for line in table if line.startswith("student-large"))
    assert large == ["student-large", "-", "-", "-", "-"]


def test_stats_cli_unreachable_gateway_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    assert stats.run(url, timeout_s=2) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"triage stats: cannot reach {url}/metrics")


def test_stats_cli_rejects_a_server_that_is_not_triage(
    upstreams: Upstreams, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fake upstream has no /metrics: 404.
    assert stats.run(upstreams.urls["small"]) == 1
    assert "answered HTTP 404" in capsys.readouterr().err


def test_stats_subtracts_shadow_spend_from_net_savings() -> None:
    text = (
        "# TYPE triage_requests_total counter\n"
        'triage_requests_total{model="s",reason="classifier",status_class="2xx"} 3\n'
        'triage_requests_total{model="t",reason="classifier",status_class="2xx"} 1\n'
        "# TYPE triage_cost_usd_total counter\n"
        'triage_cost_usd_total{model="s"} 0.5\n'
        'triage_cost_usd_total{model="t"} 2.0\n'
        "# TYPE triage_teacher_equivalent_cost_usd_total counter\n"
        'triage_teacher_equivalent_cost_usd_total{model="s"} 6.0\n'
        'triage_teacher_equivalent_cost_usd_total{model="t"} 2.0\n'
        "# TYPE triage_shadow_cost_usd_total counter\n"
        'triage_shadow_cost_usd_total{model="s"} 1.25\n'
        "# TYPE triage_student_share_target gauge\n"
        "triage_student_share_target NaN\n"
    )
    summary = stats.summarize(stats.Snapshot.from_text(text))
    assert summary.teacher == "t"
    assert summary.savings == pytest.approx(5.5)
    assert summary.student_share == pytest.approx(0.75)
    assert summary.share_target is None
    out = stats.render(summary, "http://x")
    assert "Savings           $5.5000 (68.8%)" in out
    assert "Shadow spend      $1.2500; net savings $4.2500" in out
