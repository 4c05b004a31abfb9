"""Upstream client micro-benchmark: httpx2.AsyncClient against aiohttp.ClientSession.

Both POST the bench's chat body to the canned nginx upstream from one process
pinned to one core (nginx gets another), first one request at a time, then 32
at once, and report requests/s and CPU µs per request (process user+sys time,
every thread included). Rounds alternate the clients so both see the same noise;
the table shows medians over rounds.

    .venv/bin/python bench/aiohttp_vs_httpx.py            # 3 rounds, 2000 sequential, 10000 concurrent
    .venv/bin/python bench/aiohttp_vs_httpx.py --quick

aiohttp is not a Triage dependency: `.venv/bin/pip install aiohttp` first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from canned import CannedUpstream, chat_body, ensure_tools, machine

Post = Callable[[], Awaitable[int]]


@dataclass
class Result:
    """One client, one pattern, one round."""

    requests: int
    wall_s: float
    cpu_s: float


async def _drive(post: Post, total: int, concurrency: int) -> Result:
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await post()
            if status != 200:
                raise RuntimeError(f"upstream answered {status}")

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(total, time.perf_counter() - t0, time.process_time() - cpu0)


async def _httpx_round(url: str, body: bytes, n_seq: int, n_conc: int, conc: int) -> list[Result]:
    import httpx2 as httpx

    # The same shape as router/upstream.py's ModelPool client.
    async with httpx.AsyncClient(
        headers={"content-type": "application/json"},
        timeout=httpx.Timeout(connect=2.0, read=120.0, write=120.0, pool=2.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        trust_env=False,
    ) as client:

        async def post() -> int:
            resp = await client.post(url, content=body)
            _ = resp.content
            return resp.status_code

        await _drive(post, 200, conc)  # warm-up: open connections, import lazily-loaded parts
        return [await _drive(post, n_seq, 1), await _drive(post, n_conc, conc)]


async def _aiohttp_round(url: str, body: bytes, n_seq: int, n_conc: int, conc: int) -> list[Result]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=200, limit_per_host=200, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"content-type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=120.0),
        trust_env=False,
    ) as session:

        async def post() -> int:
            async with session.post(url, data=body) as resp:
                await resp.read()
                return resp.status

        await _drive(post, 200, conc)
        return [await _drive(post, n_seq, 1), await _drive(post, n_conc, conc)]


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequential", type=int, default=2000, help="requests one at a time")
    p.add_argument("--concurrent", type=int, default=10000, help="requests with --concurrency in flight")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="fetch the 43-event SSE body instead of JSON")
    p.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (Triage runs uvloop)"
    )
    p.add_argument("--quick", action="store_true", help="1 round, 500 sequential, 2000 concurrent")
    a = p.parse_args(argv)
    if a.quick:
        a.sequential, a.concurrent, a.rounds = 500, 2000, 1
    try:
        import aiohttp
    except ImportError:
        sys.exit("bench: aiohttp is not installed; run `.venv/bin/pip install aiohttp`")
    import httpx2
    import uvloop

    tools = ensure_tools({"nginx": "nginx-light", "taskset": "util-linux"})
    ncpu = len(os.sched_getaffinity(0))
    client_core = 1 if ncpu > 1 else 0
    print(f"machine: {machine()}")
    print(
        f"cores: nginx on 0, this client process on {client_core}; loop {a.loop}; "
        f"httpx2 {httpx2.__version__}, aiohttp {aiohttp.__version__}"
    )
    print(
        f"per round: {a.sequential} sequential + {a.concurrent} with {a.concurrency} in flight; "
        f"{a.rounds} round(s), clients alternate; {'SSE' if a.stream else 'JSON'} upstream",
        flush=True,
    )

    body = chat_body("bench-student", stream=a.stream)
    runs: dict[str, list[list[Result]]] = {"httpx2": [], "aiohttp": []}
    with (
        tempfile.TemporaryDirectory(prefix="triage-clientbench-") as tmp,
        CannedUpstream(tools["nginx"], Path(tmp), "0") as nginx,
    ):
        os.sched_setaffinity(0, {client_core})
        url = (nginx.sse_url if a.stream else nginx.json_url) + "/v1/chat/completions"
        rounds = {"httpx2": _httpx_round, "aiohttp": _aiohttp_round}
        for r in range(a.rounds):
            order = list(rounds) if r % 2 == 0 else list(reversed(rounds))
            for name in order:
                coro = rounds[name](url, body, a.sequential, a.concurrent, a.concurrency)
                if a.loop == "uvloop":
                    res = uvloop.run(coro)
                else:
                    res = asyncio.run(coro)
                runs[name].append(res)
                print(
                    f"  round {r + 1} {name}: " + ", ".join(f"{x.requests / x.wall_s:.0f} rps" for x in res),
                    flush=True,
                )

    print(f"\n{'client':>8} | {'pattern':>12} | {'req/s':>8} | {'CPU µs/req':>10} | {'wall µs/req':>11}")
    print("-" * 62)
    medians: dict[tuple[str, int], tuple[float, float]] = {}
    for name, rs in runs.items():
        for i, pattern in enumerate(("sequential", f"{a.concurrency} conc.")):
            rps = statistics.median(x[i].requests / x[i].wall_s for x in rs)
            cpu = statistics.median(x[i].cpu_s * 1e6 / x[i].requests for x in rs)
            medians[name, i] = (rps, cpu)
            print(f"{name:>8} | {pattern:>12} | {rps:>8.0f} | {cpu:>10.1f} | {1e6 / rps:>11.1f}")
    for i, pattern in enumerate(("sequential", f"{a.concurrency} concurrent")):
        (h_rps, h_cpu), (a_rps, a_cpu) = medians["httpx2", i], medians["aiohttp", i]
        print(f"{pattern}: aiohttp/httpx2 req/s {a_rps / h_rps:.2f}x, CPU per request {a_cpu / h_cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
