"""Dashboard bench: how long /ui takes to load with an empty and a full (10k) ring buffer.

Triage runs in front of the canned nginx upstream (bench/canned.py); wrk fills the recorder's
ring buffer with real requests until it holds its 10,000 decisions. Debian's chromium, headless
and with its cache off, loads /ui again and again; the page marks `triage-first-render` when the
first poll's numbers are on screen, and its time since navigation start is the load time
(measured inside the browser, so the harness's own round trips do not count). The JSON the
page polls is also timed from a plain HTTP client.

    .venv/bin/python bench/ui.py               # 20 page loads each way
    .venv/bin/python bench/ui.py --loads 5

wrk and nginx on core 0, Triage on core 1, chromium unpinned. Print numbers only; assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from canned import BENCH_DIR, REPO, CannedUpstream, chat_body, cpu_ticks, ensure_tools

sys.path.insert(0, str(REPO))

from gateway import Triage  # noqa: E402

from tests.browser import Chromium, available  # noqa: E402

BUFFER = 10_000
POLLS = 200


def summary(url: str, limit: int = 100) -> tuple[float, int, dict[str, Any]]:
    """One GET of the page's JSON: seconds, bytes, document."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"{url}/ui/api/summary?limit={limit}", timeout=10) as resp:
        body = resp.read()
    return time.perf_counter() - started, len(body), json.loads(body)


def fill(url: str, wrk: str, core: str) -> int:
    """Send requests with wrk until the ring buffer is full; the number of decisions held."""
    body = chat_body("auto").decode()
    held = 0
    while held < BUFFER:
        subprocess.run(
            ["taskset", "-c", core, wrk, "-t1", "-c8", "-d3s", "-s", str(BENCH_DIR / "chat.lua")]
            + [url + "/v1/chat/completions"],
            env={**os.environ, "BENCH_BODY": body},
            capture_output=True,
            check=True,
        )
        held = summary(url, limit=1)[2]["decisions"]["total"]
        print(f"  ring buffer: {held} decisions", flush=True)
    return held


def page_loads(browser: Chromium, url: str, n: int) -> list[dict[str, float]]:
    """Load /ui n times from scratch; per load, ms from navigation start to DOMContentLoaded,
    load and the first render of data."""
    out = []
    for _ in range(n):
        browser.navigate("about:blank")
        browser.navigate(url + "/ui")
        browser.wait_for("Number(document.body.dataset.polls) >= 1", "the first render")
        timing = browser.evaluate(
            """(() => {
              const nav = performance.getEntriesByType("navigation")[0];
              const mark = performance.getEntriesByName("triage-first-render")[0];
              return {dom: nav.domContentLoadedEventEnd, load: nav.loadEventEnd, data: mark.startTime,
                      rows: document.querySelectorAll("#decisions tbody tr").length};
            })()"""
        )
        out.append(timing)
    return out


def report(label: str, loads: list[dict[str, float]], json_s: list[float], size: int) -> None:
    def stat(values: list[float]) -> str:
        return f"median {statistics.median(values):7.1f}  max {max(values):7.1f}"

    print(f"\n{label}")
    print(f"  page: DOMContentLoaded ms   {stat([x['dom'] for x in loads])}")
    print(f"  page: load event ms         {stat([x['load'] for x in loads])}")
    print(
        f"  page: first data render ms  {stat([x['data'] for x in loads])}  (rows shown {loads[-1]['rows']})"
    )
    print(f"  JSON /ui/api/summary ms     {stat([1000 * s for s in json_s])}  ({size} bytes)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=int, default=20, help="page loads per buffer state (default 20)")
    a = p.parse_args(argv)
    if not available():
        sys.exit("bench/ui.py: needs Debian's chromium (apt-get install chromium)")
    tools = ensure_tools({"nginx": "nginx-light", "wrk": "wrk", "taskset": "util-linux"})
    with (
        tempfile.TemporaryDirectory(prefix="triage-ui-bench-") as tmp,
        CannedUpstream(tools["nginx"], Path(tmp) / "nginx", "0") as nginx,
        Triage(Path(tmp), nginx.json_url, "1", None, False) as triage,
        Chromium() as browser,
    ):
        browser.call("Network.enable")
        browser.call("Network.setCacheDisabled", {"cacheDisabled": True})
        results = {}
        for state in ("empty", "full"):
            if state == "full":
                print(f"filling the ring buffer to {BUFFER} decisions with wrk ...", flush=True)
                fill(triage.url, tools["wrk"], "0")
            held = summary(triage.url, limit=1)[2]["decisions"]["total"]
            loads = page_loads(browser, triage.url, a.loads)
            timed = [summary(triage.url) for _ in range(50)]
            results[state] = (held, loads, [t for t, _, _ in timed], timed[-1][1])
            report(
                f"{held} decisions in the ring buffer ({a.loads} loads, 50 JSON GETs)", *results[state][1:]
            )
        full_1000 = [summary(triage.url, limit=1000) for _ in range(20)]
        print(
            f"\n  JSON with limit=1000 (a page of 1000 rows) ms: median "
            f"{1000 * statistics.median(t for t, _, _ in full_1000):.1f} ({full_1000[-1][1]} bytes)"
        )
        # Triage's own CPU per poll (user + sys of its process), the gateway otherwise idle: what
        # one open page costs the gateway, however noisy the machine's wall clock is.
        before = cpu_ticks(triage.pids())
        for _ in range(POLLS):
            summary(triage.url)
        per_poll_ms = 1000 * (cpu_ticks(triage.pids()) - before) / POLLS
        print(
            f"\n  Triage CPU per /ui/api/summary (10k buffer, {POLLS} polls): {per_poll_ms:.2f} ms; "
            f"one page polling every 2 s uses {per_poll_ms / 2000:.2%} of a core"
        )
        empty, full = results["empty"][1], results["full"][1]
        print(
            "\nfirst data render, full / empty buffer: "
            f"{statistics.median(x['data'] for x in full) / statistics.median(x['data'] for x in empty):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
