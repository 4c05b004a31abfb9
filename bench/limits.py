"""Key limits' cost per request: in process against Redis, at several concurrencies.

Drives `router.limits.SharedLimits` (admission, then the charge of the answer) directly against
a redis-server started here, and `router.auth.KeyState` (the in-process buckets) the same way,
with no HTTP around them, so the numbers are what the limits themselves add: CPU per request
(this process only; Redis's own CPU is not counted) and requests per second. Redis runs twice:
with leases (the default `state.lease_fraction`) and exact (`lease_fraction: 0`, a round trip
per admission, shared by the admissions of one event-loop turn).

    .venv/bin/python bench/limits.py                 # concurrency 1, 8, 32; 3 rounds
    .venv/bin/python bench/limits.py --requests 5000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from canned import REPO, ensure_tools, machine
from gateway import RedisServer

sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from router.auth import KeyState, _Bucket  # noqa: E402
from router.config import Limits, StateConfig  # noqa: E402
from router.limits import SharedLimits  # noqa: E402
from router.metrics import Metrics  # noqa: E402
from router.state import SharedState  # noqa: E402

URL_ENV = "TRIAGE_BENCH_REDIS_URL"
LIMITS = Limits(requests_per_minute=10**9, tokens_per_minute=10**12, budget_usd=10**9)


async def _redis_request(limits: SharedLimits) -> None:
    admission = limits.admit("bench")
    await asyncio.sleep(0)  # as the request path does: the batch goes out, the request goes on
    await limits.check("bench", admission)
    limits.charge("bench", 120, 0.0001)


async def _local_request(key: KeyState) -> None:
    key.admit()
    await asyncio.sleep(0)
    key.charge(120, 0.0001)


async def _measure(one: object, concurrency: int, requests: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second) for `requests` spread over `concurrency` tasks."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()  # type: ignore[operator]

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    done = requests // concurrency * concurrency
    return (time.process_time() - cpu) / done * 1e6, done / (time.perf_counter() - wall)


async def _run(concurrencies: list[int], requests: int, rounds: int) -> None:
    metrics = Metrics(CollectorRegistry())
    # A generous timeout: on a loaded machine a failed call would be skipped (cheaper), not measured.
    leased = SharedState(StateConfig(redis_url_env=URL_ENV, timeout_s=2.0), metrics)
    exact = SharedState(StateConfig(redis_url_env=URL_ENV, timeout_s=2.0, lease_fraction=0), metrics)
    sides = {"leased": SharedLimits(leased, LIMITS, metrics), "exact": SharedLimits(exact, LIMITS, metrics)}
    key = KeyState("bench", _Bucket(10**9), _Bucket(10**12), budget_usd=10**9)

    async def local_one() -> None:
        await _local_request(key)

    def redis_one(limits: SharedLimits) -> object:
        async def one() -> None:
            await _redis_request(limits)

        return one

    for limits in sides.values():
        for _ in range(300):  # connections open, script loaded
            await _redis_request(limits)
    print(
        f"{'conc':>5} | {'in process µs':>13} {'req/s':>9} | {'leased µs':>9} {'req/s':>9} "
        f"| {'exact µs':>9} {'req/s':>9}"
    )
    for conc in concurrencies:
        runs: dict[str, list[tuple[float, float]]] = {"local": [], "leased": [], "exact": []}
        for _ in range(rounds):  # interleaved, so drift in the machine's load hits every side
            runs["local"].append(await _measure(local_one, conc, requests))
            for name, limits in sides.items():
                runs[name].append(await _measure(redis_one(limits), conc, requests))
        cells = []
        for name in ("local", "leased", "exact"):
            cpu = statistics.median(x[0] for x in runs[name])
            rps = statistics.median(x[1] for x in runs[name])
            cells.append(f"{cpu:>9.1f} {rps:>9.0f}")
        print(f"{conc:>5} | {cells[0]:>23} | {cells[1]} | {cells[2]}")
    print("µs = this process's CPU per request (admission + charge), median of rounds")
    for limits in sides.values():
        await limits.aclose()
    await leased.aclose()
    await exact.aclose()


def main() -> int:
    """Start redis-server, run every concurrency, stop it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated (default 1,8,32)")
    p.add_argument("--requests", type=int, default=3000, help="requests per round (default 3000)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tools = ensure_tools({"redis-server": "redis-server", "taskset": "util-linux"})
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with (
        tempfile.TemporaryDirectory(prefix="triage-limits-") as tmp,
        RedisServer(tools["redis-server"], Path(tmp) / "redis", "0") as redis,
    ):
        os.environ[URL_ENV] = redis.url
        os.sched_setaffinity(0, {len(os.sched_getaffinity(0)) - 1})
        uvloop.run(_run([int(c) for c in a.concurrency.split(",")], a.requests, a.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
