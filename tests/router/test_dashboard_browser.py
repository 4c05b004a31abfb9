"""The dashboard in a real browser: Debian's chromium, headless, against `triage serve`.

A scripted workload (two client keys, easy and hard prompts, a stream, fallbacks) goes through
a `triage serve` process in front of the fake upstreams. The page must ask for the token, then
show the same share, spend, savings and fallback counts as /metrics, and follow new traffic
by polling, without a reload.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from router import stats
from tests.browser import Chromium, available
from tests.conftest import Upstreams, base_config
from tests.loopback import ServeProcess, triage_process
from tests.router.test_dashboard import ADMIN_TOKEN, METRICS_TOKEN, workload

pytestmark = pytest.mark.skipif(
    not available(), reason="needs Debian's chromium (tests/setup.sh as root, or apt-get install chromium)"
)

KEYS = "alice:sk-alice,bob:sk-bob"
# Read every number the page shows, with its exact value (data-value) and its text.
READ_PAGE = """(() => {
  const v = (id) => { const e = document.getElementById(id); return [e.dataset.value, e.textContent]; };
  const rows = (sel, attr) => Object.fromEntries([...document.querySelectorAll(sel)].map(
    (e) => [e.dataset[attr], Number(e.dataset.value)]));
  return {
    polls: Number(document.body.dataset.polls || 0),
    requests: v("requests"), share: v("share"), spend: v("spend"), teacher: v("teacher-spend"),
    savings: v("savings"), savings_pct: v("savings-pct"), fallbacks: v("fallbacks-total"),
    by_reason: rows("#fallbacks-reason .row", "reason"),
    by_model: rows("#fallbacks-model .row", "model"),
    keys: [...document.querySelectorAll("#keys tbody tr")].map(
      (tr) => [tr.cells[0].textContent, Number(tr.cells[1].dataset.value)]),
    decisions: [...document.querySelectorAll("#decisions tbody tr")].map((tr) => tr.cells[1].textContent),
    thresholds: [...document.querySelectorAll("#scores line[data-model]")].map(
      (l) => [l.dataset.model, Number(l.dataset.value)]),
    bars: [...document.querySelectorAll("#scores rect")].reduce((n, r) => n + Number(r.dataset.value), 0),
    kept: window.__kept === 42,
  };
})()"""


@pytest.fixture
def served(upstreams: Upstreams, tmp_path: Path) -> Iterator[ServeProcess]:
    raw = base_config(upstreams.urls)
    raw["auth"] = {
        "keys_env": "TRIAGE_TEST_KEYS",
        "metrics_token_env": "TRIAGE_TEST_METRICS",
        "admin_token_env": "TRIAGE_TEST_ADMIN",
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "TRIAGE_TEST_KEYS": KEYS,
        "TRIAGE_TEST_METRICS": METRICS_TOKEN,
        "TRIAGE_TEST_ADMIN": ADMIN_TOKEN,
    }
    with triage_process(cfg, env=env, log=tmp_path / "triage.log") as proc:
        yield proc


def scrape(url: str, token: str = METRICS_TOKEN) -> stats.Summary:
    """`triage stats`'s numbers from the gateway's /metrics."""
    resp = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    return stats.summarize(stats.Snapshot.from_text(resp.text))


def number(text: str) -> float:
    return float(text.replace("$", "").replace("%", "").replace(",", ""))


def page_equals_metrics(page: dict[str, Any], s: stats.Summary, key_spend: dict[str, float]) -> None:
    """What the page shows is what /metrics says: exact values, and text rounded from them."""
    assert s.student_share is not None and s.savings_ratio is not None
    expected = {
        "requests": s.requests,
        "share": s.student_share,
        "spend": s.cost,
        "teacher": s.teacher_equivalent,
        "savings": s.savings,
        "savings_pct": s.savings_ratio,
        "fallbacks": sum(s.fallbacks.values()),
    }
    for name, value in expected.items():
        exact, text = page[name]
        assert float(exact) == value, (name, page[name], value)
        shown = number(text) / (100 if text.endswith("%") else 1)
        # The text is the exact value rounded for display (6 decimals of $, 1 of a percent).
        assert shown == pytest.approx(value, abs=1e-3 if text.endswith("%") else 1e-6), (name, text)
    by_reason: dict[str, float] = {}
    by_model: dict[str, float] = {}
    for (model, reason), n in s.fallbacks.items():
        by_reason[reason] = by_reason.get(reason, 0.0) + n
        by_model[model] = by_model.get(model, 0.0) + n
    assert page["by_reason"] == by_reason
    assert page["by_model"] == by_model
    assert dict(page["keys"]) == key_spend


def key_spend(url: str, token: str = METRICS_TOKEN) -> dict[str, float]:
    """Spend per key name, from /metrics."""
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {token}"}).text
    snap = stats.Snapshot.from_text(text)
    return snap.by("triage_key_cost_usd_total", "key")


def test_dashboard_in_chromium_shows_the_metrics_live(served: ServeProcess, upstreams: Upstreams) -> None:
    url = served.url
    ids = workload(url, upstreams, key="sk-alice") + workload(url, upstreams, key="sk-bob")
    # Auth: the JSON needs a token; the page loads without one and asks for it.
    assert httpx.get(url + "/ui/api/summary").status_code == 401
    assert httpx.get(url + "/ui/api/summary", headers={"authorization": "Bearer sk-alice"}).status_code == 401

    with Chromium() as browser:
        browser.navigate(url + "/ui?every=0.5")
        browser.wait_for("!document.getElementById('login').hidden", "the token form")
        assert browser.evaluate("document.getElementById('board').hidden") is True
        assert browser.evaluate("document.getElementById('requests').textContent") == ""
        login = (
            "document.getElementById('token').value = {!r};"
            "document.getElementById('login').requestSubmit(); true"
        )
        browser.evaluate(login.format("not-the-token"))
        browser.wait_for(
            "document.getElementById('login-error').textContent.includes('refused')", "the refusal"
        )
        assert browser.evaluate("document.getElementById('board').hidden") is True
        browser.evaluate(login.format(METRICS_TOKEN))
        browser.wait_for("Number(document.body.dataset.polls) >= 1", "the first update")
        browser.evaluate("window.__kept = 42")

        page = browser.evaluate(READ_PAGE)
        s = scrape(url)
        assert s.requests == 10 and sum(s.fallbacks.values()) == 2
        page_equals_metrics(page, s, key_spend(url))
        assert set(dict(page["keys"])) == {"alice", "bob"}
        assert page["decisions"] == ids[::-1]
        assert sorted(page["thresholds"]) == [["student-large", 0.5], ["student-small", 0.3]]
        assert page["bars"] == 10

        # More traffic: the page follows by polling, in the same document (no reload).
        more = workload(url, upstreams, key="sk-bob")
        browser.wait_for(
            "Number(document.getElementById('requests').dataset.value) === 15", "the page to show new traffic"
        )
        page = browser.evaluate(READ_PAGE)
        assert page["kept"] is True
        assert page["polls"] >= 2
        page_equals_metrics(page, scrape(url), key_spend(url))
        assert page["decisions"][:5] == more[::-1]
        assert browser.console == []


def test_the_page_writes_client_text_as_text_and_keeps_its_interval_sane(served: ServeProcess) -> None:
    url = served.url
    # A client chooses its request id; the table shows it, as text.
    hostile = '<img id="pwn" src="x"><b>id</b>'
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="sk-alice", max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "thanks"}],
        extra_headers={"x-request-id": hostile},
    )
    assert raw.headers["x-request-id"] == hostile
    with Chromium() as browser:
        # An interval past what setInterval holds would overflow to a poll every few milliseconds.
        browser.navigate(url + "/ui?every=Infinity")
        browser.wait_for("!document.getElementById('login').hidden", "the token form")
        assert browser.evaluate("document.getElementById('every').textContent") == "3600"
        login = (
            "document.getElementById('token').value = {!r};"
            "document.getElementById('login').requestSubmit(); true"
        )
        # fetch refuses a header that is not ASCII: the form says so instead of polling in vain.
        browser.evaluate(login.format("tökén"))
        assert "ASCII" in browser.evaluate("document.getElementById('login-error').textContent")
        assert browser.evaluate("document.getElementById('status').textContent") == "token needed"
        browser.evaluate(login.format(METRICS_TOKEN))
        browser.wait_for("Number(document.body.dataset.polls) >= 1", "the first update")
        page = browser.evaluate(READ_PAGE)
        assert page["decisions"] == [hostile]
        assert browser.evaluate("document.querySelectorAll('#pwn, #decisions b').length") == 0
        assert browser.console == []
