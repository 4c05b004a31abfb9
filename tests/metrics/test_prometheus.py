"""The dashboard and alert rules, evaluated by a real Prometheus scraping a real gateway.

A Prometheus server (the Debian `prometheus` package, see tests/setup.sh)
scrapes a gateway in front of the fake upstreams every second and loads
`deploy/prometheus/alerts.yml`. After known traffic, every expression of
`deploy/grafana/triage.json` and every alert rule goes through the HTTP API.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from router import stats
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "triage.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="needs the `prometheus` and `promtool` binaries (run tests/setup.sh as root, "
        "or apt-get install prometheus)",
    ),
]

EASY = "thanks!"
HARD = (
    "Prove that the sum of the first n odd numbers equals n^2, step by step, then derive "
    "the closed form of sum k^3 and explain why the induction works. Analyze edge cases. "
    "```python\ndef f(n):\n    return n\n```"
)
# Grafana's variables, as a dashboard with "All" models selected would send them.
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s", "$model": ".*"}
# Queries over these must show the traffic: a non-empty result with a value above zero.
TRAFFIC = (
    "triage_requests_total",
    "triage_cost_usd_total",
    "triage_teacher_equivalent_cost_usd_total",
    "triage_prompt_tokens_total",
    "triage_completion_tokens_total",
    "triage_usage_missing_total",
    "triage_rejected_requests_total",
)
# Quantiles over these must give at least one finite number once requests were observed.
OBSERVED = (
    "triage_request_duration_seconds",
    "triage_time_to_first_token_seconds",
    "triage_upstream_duration_seconds",
    "triage_overhead_seconds",
    "triage_classifier_duration_seconds",
    "triage_classifier_score",
)
# Given the workload below (1 fallback and 1 5xx in 10 requests), exactly these alerts are pending.
EXPECTED_PENDING = {"TriageFallbackRateHigh", "TriageErrorRateHigh"}
REQUESTS = 10


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target in the dashboard, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expr) of every rule in alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in doc["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
    return expr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


class Prometheus:
    """A Prometheus server on a loopback port, queried through its HTTP API."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def query(self, expr: str) -> dict[str, Any]:
        resp = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        data: dict[str, Any] = body["data"]
        return data

    def values(self, expr: str) -> list[float]:
        data = self.query(expr)
        assert data["resultType"] == "vector", (expr, data)
        return [float(item["value"][1]) for item in data["result"]]

    def get(self, path: str) -> Any:
        body = httpx.get(self.url + path, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]


@pytest.fixture
def metered_gateway(upstreams: Upstreams, make_gateway: GatewayFactory) -> Iterator[Gateway]:
    with make_gateway(base_config(upstreams.urls)) as gw:
        yield gw


@pytest.fixture
def prometheus(metered_gateway: Gateway, tmp_path: Path) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    target = metered_gateway.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "triage", "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                return httpx.get(prom.url + "/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "Prometheus to start")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if it hangs on shutdown
            proc.kill()
            proc.wait(5)


def chat(gw: Gateway, content: str, model: str = "auto", stream: bool = False) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as resp:
        resp.read()
        return resp.status_code


def push_traffic(gw: Gateway, upstreams: Upstreams) -> None:
    """Easy and hard prompts, streams (one without usage), a fallback, a 4xx, a 5xx and a rejection."""
    statuses = [chat(gw, EASY) for _ in range(3)] + [chat(gw, HARD) for _ in range(2)]
    statuses.append(chat(gw, EASY, stream=True))
    upstreams.small.mode = "no_usage"
    statuses.append(chat(gw, EASY, stream=True))
    upstreams.small.mode = "status"
    upstreams.small.status = 503
    statuses.append(chat(gw, EASY))  # falls back to the teacher
    upstreams.small.status = 422
    statuses.append(chat(gw, EASY, model="student-small"))  # passed through
    upstreams.teacher.mode = "status"
    upstreams.teacher.status = 503
    statuses.append(chat(gw, HARD))  # the teacher has no fallback
    upstreams.small.reset()
    upstreams.teacher.reset()
    assert statuses == [200] * 8 + [422, 503]
    assert len(statuses) == REQUESTS
    # Refused before routing: counted as rejected, not as an answered request.
    assert chat(gw, EASY, model="no-such-model") == 404


def test_promtool_accepts_the_shipped_rules_and_config() -> None:
    assert PROMTOOL is not None
    rules = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout + rules.stderr
    config = subprocess.run(
        [PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout + config.stderr


def test_dashboard_and_alerts_evaluate_over_live_metrics(
    prometheus: Prometheus, metered_gateway: Gateway, upstreams: Upstreams
) -> None:
    gw = metered_gateway
    # A scrape before any traffic, so rates over the window see the counters rise from zero.
    wait_for(lambda: prometheus.values('up{job="triage"}') == [1.0], "the first scrape of the gateway")
    push_traffic(gw, upstreams)
    wait_for(
        lambda: prometheus.values("sum(triage_requests_total)") == [float(REQUESTS)],
        "a scrape that sees all the traffic",
    )
    time.sleep(1.2)  # one more scrape and rule evaluation

    exposition = httpx.get(gw.url + "/metrics").text
    exported = set(re.findall(r"triage_\w+", exposition))
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    for title, raw in exprs:
        expr = substitute(raw)
        for name in set(re.findall(r"triage_\w+", expr)):
            assert name in exported, f"panel {title!r} reads {name}, which the gateway does not export"
        data = prometheus.query(expr)  # asserts status success
        if any(name in expr for name in TRAFFIC):
            vals = [float(item["value"][1]) for item in data["result"]]
            assert any(math.isfinite(v) and v > 0 for v in vals), (title, expr, data)
        elif any(name in expr for name in OBSERVED):
            vals = [float(item["value"][1]) for item in data["result"]]
            assert any(math.isfinite(v) for v in vals), (title, expr, data)

    # The dashboard's savings % is the same number `triage stats` prints from /metrics.
    savings_expr = next(substitute(e) for t, e in exprs if t == "Savings % (time range)")
    summary = stats.summarize(stats.fetch(gw.url))
    assert summary.savings_ratio is not None and 0.3 < summary.savings_ratio < 0.9
    assert prometheus.values(savings_expr) == [pytest.approx(summary.savings_ratio, rel=1e-6)]

    firing_now = set()
    for name, expr in alert_rules():
        if prometheus.values(expr):
            firing_now.add(name)
    assert firing_now == EXPECTED_PENDING

    def rules_evaluated() -> bool:
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {name for name, _ in alert_rules()}
        assert all(r["health"] in ("ok", "unknown") for r in rules), rules
        pending = {a["labels"]["alertname"] for r in rules for a in r.get("alerts", [])}
        return all(r["health"] == "ok" for r in rules) and pending == EXPECTED_PENDING

    wait_for(rules_evaluated, "every rule to evaluate cleanly with the expected alerts pending")
    alerts = prometheus.get("/api/v1/alerts")["alerts"]
    assert {(a["labels"]["alertname"], a["state"]) for a in alerts} == {
        (name, "pending") for name in EXPECTED_PENDING
    }
    assert all(a["labels"]["severity"] in ("warning", "critical") for a in alerts)
