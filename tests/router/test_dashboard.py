"""The dashboard's JSON (/ui/api/summary) and assets: same numbers as /metrics, paging, access.

The page itself is driven in a real browser in test_dashboard_browser.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml
from prometheus_client import Metric

from router import stats
from router.app import SAMPLE_EVERY_S
from router.records import RequestRecord
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import triage_process

EASY = "thanks!"
HARD = (
    "Prove that the sum of the first n odd numbers equals n^2, step by step, then derive "
    "the closed form of sum k^3 and explain why the induction works. Analyze edge cases."
)
METRICS_TOKEN = "metrics-secret"
ADMIN_TOKEN = "admin-secret"


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def workload(url: str, upstreams: Upstreams, key: str = "none") -> list[str]:
    """Easy and hard prompts, a stream, and one fallback; returns the request ids, oldest first."""
    sdk = client(url, key)
    ids = []
    for text in (EASY, EASY, HARD):
        raw = sdk.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": text}]
        )
        ids.append(raw.headers["x-request-id"])
    with sdk.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": EASY}], stream=True
    ) as streamed:
        ids.append(streamed.headers["x-request-id"])
        for _ in streamed.iter_lines():
            pass
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": EASY}]
    )
    ids.append(raw.headers["x-request-id"])
    upstreams.small.reset()
    return ids


def agrees_with_metrics(doc: dict[str, Any], s: stats.Summary) -> None:
    """Every aggregate of the JSON equals what `triage stats` reads from /metrics."""
    assert doc["requests"] == s.requests
    assert doc["teacher"] == s.teacher
    assert doc["share"]["students"] == s.student_share
    assert doc["share"]["classifier"] == s.student_share_classifier
    assert doc["spend"]["actual_usd"] == s.cost
    assert doc["spend"]["teacher_only_usd"] == s.teacher_equivalent
    assert doc["spend"]["savings_usd"] == s.savings
    assert doc["spend"]["savings_ratio"] == s.savings_ratio
    assert doc["fallbacks"]["total"] == sum(s.fallbacks.values())
    by_reason: dict[str, float] = {}
    for (_, reason), n in s.fallbacks.items():
        by_reason[reason] = by_reason.get(reason, 0.0) + n
    assert doc["fallbacks"]["by_reason"] == by_reason
    for row, m in zip(doc["models"], s.models, strict=True):
        assert (row["name"], row["requests"], row["cost_usd"]) == (m.name, m.requests, m.cost)
        assert row["latency_p95_s"] == m.latency_p95
        assert row["ttft_p50_s"] == m.ttft_p50


def summary(url: str, token: str | None = None, **params: Any) -> dict[str, Any]:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    resp = httpx.get(url + "/ui/api/summary", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def test_summary_equals_metrics_and_lists_decisions(gateway: Gateway, upstreams: Upstreams) -> None:
    ids = workload(gateway.url, upstreams)
    doc = summary(gateway.url)
    s = stats.summarize(stats.fetch(gateway.url))
    agrees_with_metrics(doc, s)
    assert doc["requests"] == 5
    assert doc["fallbacks"]["by_reason"] == {"upstream_error": 1.0}
    assert doc["fallbacks"]["by_model"] == {"student-small": 1.0}
    assert 0 < doc["share"]["students"] < 1
    assert doc["spend"]["savings_usd"] > 0
    # The score histogram holds every scored request; the thresholds are the students' now.
    assert sum(b["count"] for b in doc["scores"]["buckets"]) == doc["scores"]["count"] == 5
    assert doc["scores"]["thresholds"] == {"student-large": 0.5, "student-small": 0.3}
    assert {(c["model"], c["state"]) for c in doc["circuits"]} == {
        ("student-small", "closed"),
        ("student-large", "closed"),
        ("teacher", "closed"),
    }
    table = doc["decisions"]
    assert (table["source"], table["total"], table["offset"], table["limit"]) == ("memory", 5, 0, 100)
    assert [r["request_id"] for r in table["rows"]] == ids[::-1]  # newest first
    newest = table["rows"][0]
    assert (newest["model"], newest["reason"]) == ("teacher", "fallback")
    assert newest["fallback"] == "upstream_error"
    assert newest["prompt_tokens"] > 0 and newest["cost_usd"] > 0
    assert "prompt" not in newest and "answer" not in newest  # the table never shows captured text
    assert table["rows"][1]["stream"] is True


def record(i: int) -> RequestRecord:
    return RequestRecord(
        ts=1_700_000_000.0 + i,
        request_id=f"req-{i}",
        key=None,
        api="chat",
        requested="auto",
        model="student-small",
        attempted=("student-small",),
        reason="classifier",
        score=0.1,
        threshold_factor=1.0,
        status=200,
        stream=False,
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=1e-6,
        teacher_cost_usd=1e-5,
        latency_ms=3.0,
        ttft_ms=None,
        upstream_ms=2.0,
        fallback=None,
        error=None,
        quality="passed",
        shadowed=False,
    )


def test_decisions_page_through_a_full_ring_buffer(gateway: Gateway) -> None:
    recent = gateway.app.state.recorder.recent
    recent.extend(record(i) for i in range(recent.maxlen + 5))  # the oldest five fall out
    first = summary(gateway.url)["decisions"]
    assert first["total"] == recent.maxlen == 10_000
    assert [r["request_id"] for r in first["rows"]] == [f"req-{i}" for i in range(10_004, 9_904, -1)]
    last = summary(gateway.url, offset=9_990, limit=50)["decisions"]
    assert [r["request_id"] for r in last["rows"]] == [f"req-{i}" for i in range(14, 4, -1)]
    assert summary(gateway.url, offset=20_000)["decisions"]["rows"] == []
    # The full buffer turns over: the same page, the same total, a new newest row.
    assert summary(gateway.url)["decisions"] == first
    recent.append(record(20_000))
    again = summary(gateway.url)["decisions"]
    assert again["total"] == first["total"] and again["rows"][0]["request_id"] == "req-20000"


@pytest.mark.parametrize(
    "query",
    [
        "limit=1001",
        "limit=many",
        "offset=-1",
        "offset=99999999999",
        "limit=",
        "limit=1e3",
        "limit=0x10",
        "limit=%20%205",  # int() would take these four; the page never sends them
        "limit=%2B5",
        "limit=1_0",
        "limit=%D9%A3",  # an Arabic-Indic digit
        "limit=%FF",
        "limit=" + "9" * 5000,
        "offset=-1&offset=0",  # a repeated parameter is refused, not resolved by its last copy
        "limit=5&limit=5",
    ],
)
def test_a_malformed_page_is_a_400_naming_the_parameter(gateway: Gateway, query: str) -> None:
    resp = httpx.get(f"{gateway.url}/ui/api/summary?{query}")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", query.partition("=")[0])


class CountingCollector:
    """Registered beside the gateway's metrics: counts how often the registry is read."""

    def __init__(self) -> None:
        self.collections = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.collections += 1
        return []


def test_a_tight_poll_loop_reads_the_metrics_once_an_interval(gateway: Gateway) -> None:
    reads = CountingCollector()
    gateway.registry.register(reads)
    aggregates = gateway.app.state.summary_aggregates
    now = [1_000.0]
    aggregates.clock = lambda: now[0]  # a clock that stands still while the loop runs
    before = summary(gateway.url)
    for offset in range(30):
        summary(gateway.url, offset=offset, limit=1000)
    assert reads.collections == 1
    # New traffic: the table shows it at once, the totals within an interval.
    raw = client(gateway.url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": EASY}]
    )
    doc = summary(gateway.url)
    assert doc["decisions"]["rows"][0]["request_id"] == raw.headers["x-request-id"]
    assert doc["requests"] == before["requests"] == 0 and doc["generated_at"] == before["generated_at"]
    now[0] += aggregates.ttl_s
    doc = summary(gateway.url)
    assert doc["requests"] == 1 and reads.collections == 2
    agrees_with_metrics(doc, stats.summarize(stats.fetch(gateway.url)))


def test_page_and_assets_ship_with_a_strict_policy(gateway: Gateway) -> None:
    page = httpx.get(gateway.url + "/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="ui/ui.js"' in page.text and 'href="ui/ui.css"' in page.text
    for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
        asset = httpx.get(f"{gateway.url}/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    for missing in ("/ui/other.js", "/ui/index.html"):
        resp = httpx.get(gateway.url + missing)
        assert resp.status_code == 404
        assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture
def tokens_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRIAGE_TEST_METRICS", METRICS_TOKEN)
    monkeypatch.setenv("TRIAGE_TEST_ADMIN", ADMIN_TOKEN)
    yield


@pytest.mark.parametrize(
    ("auth", "accepted"),
    [
        ({"metrics_token_env": "TRIAGE_TEST_METRICS"}, {METRICS_TOKEN}),
        ({"admin_token_env": "TRIAGE_TEST_ADMIN"}, {ADMIN_TOKEN}),
        (
            {"metrics_token_env": "TRIAGE_TEST_METRICS", "admin_token_env": "TRIAGE_TEST_ADMIN"},
            {METRICS_TOKEN, ADMIN_TOKEN},
        ),
    ],
    ids=["metrics", "admin", "both"],
)
def test_summary_needs_the_metrics_or_admin_token(
    tokens_env: None,
    upstreams: Upstreams,
    make_gateway: GatewayFactory,
    auth: dict[str, str],
    accepted: set[str],
) -> None:
    raw = base_config(upstreams.urls)
    raw["auth"] = auth
    with make_gateway(raw) as gw:
        for header in (None, "Bearer", "Bearer wrong", f"Basic {METRICS_TOKEN}", METRICS_TOKEN):
            headers = {} if header is None else {"authorization": header}
            resp = httpx.get(gw.url + "/ui/api/summary", headers=headers)
            assert resp.status_code == 401, header
            assert "token" in resp.json()["error"]["message"]
        for token in (METRICS_TOKEN, ADMIN_TOKEN):
            resp = httpx.get(gw.url + "/ui/api/summary", headers={"authorization": f"Bearer {token}"})
            assert resp.status_code == (200 if token in accepted else 401), token
        # The page holds no data and loads without a token; it asks for one.
        assert httpx.get(gw.url + "/ui").status_code == 200
        assert gw.metric("triage_rejected_requests_total", {"code": "401"}) >= 5


def test_open_without_tokens(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/ui/api/summary").status_code == 200


def test_workers_report_the_merged_metrics(upstreams: Upstreams, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(base_config(upstreams.urls)))
    with triage_process(cfg, "--workers", "2") as served:
        for i in range(30):
            # A new connection each time, so the kernel spreads them over both workers.
            with client(served.url) as sdk:
                sdk.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": HARD if i % 3 == 0 else EASY}]
                )
        upstreams.small.mode = "status"
        upstreams.small.status = 503
        for _ in range(4):
            with client(served.url) as sdk:
                sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": EASY}])
        upstreams.small.reset()
        # Each worker writes its counts to the shared files at least once a second.
        time.sleep(SAMPLE_EVERY_S + 0.5)
        rows = set()
        for _ in range(6):  # whichever worker answers, the aggregates are every worker's
            doc = summary(served.url)
            agrees_with_metrics(doc, stats.summarize(stats.fetch(served.url)))
            assert doc["requests"] == 34
            assert doc["fallbacks"]["total"] == 4
            assert not math.isnan(doc["spend"]["savings_usd"])
            rows.add(doc["decisions"]["total"])
        # The table is the answering worker's own ring buffer, and says so.
        assert all(0 < n <= 34 for n in rows)
        assert doc["decisions"]["source"] == "memory, this worker"
