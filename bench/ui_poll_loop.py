"""Dashboard JSON under abuse: completions while clients poll /ui/api/summary in a tight loop.

`triage serve` runs in front of the tests' fake upstreams (in this process); one client sends
sequential chat completions and reports their median latency and rate, first alone, then with
pollers beside it: separate processes that GET the dashboard's JSON (or /healthz, the cheapest
answer the gateway gives, as the floor any tight loop costs) back to back, as fast as the
gateway answers. Print numbers only; assert nothing.

    .venv/bin/python bench/ui_poll_loop.py                 # 2 pollers, 300 completions a phase
    .venv/bin/python bench/ui_poll_loop.py --pollers 4 --requests 500
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2 as httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import base_config  # noqa: E402
from tests.fake_upstream import FakeState, make_fake  # noqa: E402
from tests.loopback import serve, triage_process  # noqa: E402

POLLER = """
import sys
import httpx2 as httpx
with httpx.Client() as client:
    while True:
        client.get(sys.argv[1])
"""
BODY = {"model": "auto", "messages": [{"role": "user", "content": "thanks"}]}
PHASES = (
    ("alone", None),
    ("beside /healthz pollers", "/healthz"),
    ("beside summary pollers, limit=100", "/ui/api/summary?limit=100"),
    ("beside summary pollers, limit=1000", "/ui/api/summary?limit=1000"),
    ("alone again", None),
)


def completions(client: httpx.Client, n: int) -> tuple[float, float]:
    """(median latency in ms, completions a second) over `n` sequential requests."""
    latencies = []
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        client.post("/v1/chat/completions", json=BODY).raise_for_status()
        latencies.append(time.perf_counter() - t)
    return statistics.median(latencies) * 1000, n / (time.perf_counter() - started)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--pollers", type=int, default=2, help="polling processes per phase")
    parser.add_argument("--requests", type=int, default=300, help="completions per phase")
    args = parser.parse_args()
    states = [FakeState("small"), FakeState("large"), FakeState("teacher")]
    with ExitStack() as stack:
        urls = {s.name: stack.enter_context(serve(make_fake(s))) for s in states}
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(base_config(urls)))
        served = stack.enter_context(triage_process(config))
        client = stack.enter_context(httpx.Client(base_url=served.url))
        completions(client, args.requests)  # warm up, and fill the table
        print(f"{args.pollers} pollers, {args.requests} sequential completions a phase")
        for label, path in PHASES:
            pollers = []
            if path is not None:
                for _ in range(args.pollers):
                    pollers.append(subprocess.Popen([sys.executable, "-c", POLLER, served.url + path]))
            try:
                time.sleep(1.0 if pollers else 0.0)
                median, rate = completions(client, args.requests)
            finally:
                for p in pollers:
                    p.kill()
                    p.wait()
            print(f"{label:<38} median {median:7.2f} ms   {rate:6.0f} completions/s", flush=True)


if __name__ == "__main__":
    main()
