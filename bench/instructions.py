"""Instructions per request, counted by callgrind: this checkout against a baseline revision.

Wall-clock numbers on a shared 2-core machine drift by ±15% between runs; an
instruction count does not (valgrind counts the same total for the same binary and
inputs whatever else the machine is doing). Each side runs `triage serve` under
`valgrind --tool=callgrind` with counting off, is warmed up, then counts exactly
`--requests` requests sent over 32 keep-alive connections by an aiohttp client
outside valgrind, and prints instructions per request and their ratio.

    .venv/bin/python bench/instructions.py --baseline d9b51c6
    .venv/bin/python bench/instructions.py --baseline d9b51c6 --api messages   # one API this side
    .venv/bin/python bench/instructions.py --baseline d9b51c6 --cache-sim     # + simulated cache misses
    .venv/bin/python bench/instructions.py --baseline d9b51c6 --mode pinned   # no scoring
    .venv/bin/python bench/instructions.py --store sqlite    # this checkout, traffic store off and on
    .venv/bin/python bench/instructions.py --limits          # key limits: off, in process, in Redis

The baseline always sends chat; `--api` picks what this checkout is sent (chat,
responses or messages), so a translated API's cost shows next to chat's.

Equal instruction counts can still take different times: a request that touches more
memory (a larger classifier's tables, say) misses the caches more often. `--cache-sim`
has callgrind simulate the caches too and prints first-level and last-level misses per
request, and a cycle estimate (instructions + 10 per L1 miss + 100 per last-level miss,
a common rule of thumb) that tracks wall time better than instructions alone.
`--mode pinned` sends `model: student-small`, so the classifier never runs: what is
left is the gateway's own path.

`--limits` counts this checkout three times: no key limits, one key with every limit on kept
in process, and the same limits in a redis-server started here (the gateway's own
instructions; Redis's are not counted).

`--store sqlite|postgres` compares this checkout with the traffic store off and on
instead of two checkouts. Counting goes on for `STORE_SETTLE_S` after the last answer on
both sides, so the store's writer thread has written every counted request's row
(callgrind counts every thread of the process).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import yaml
from canned import API_PATHS, REPO, CannedUpstream, api_body, ensure_tools, free_port, wait_port
from gateway import (
    BENCH_KEY,
    PYTHON,
    STUDENT,
    RedisServer,
    _limits_env,
    baseline_checkout,
    limits_config,
    store_section,
    triage_config,
)

# callgrind's event names with --cache-sim=yes, and the cycle estimate's weights.
_MISSES = {"L1 misses": ("I1mr", "D1mr", "D1mw"), "LL misses": ("ILmr", "DLmr", "DLmw")}
_CYCLES = {"Ir": 1, "L1 misses": 10, "LL misses": 100}
# With --store, counting stays on this long after the last answer (past the store's flush interval).
STORE_SETTLE_S = 3.0


def _count(
    repo: Path,
    upstream: str,
    tmp: Path,
    name: str,
    api: str,
    requests: int,
    model: str,
    cache_sim: bool,
    extra: dict[str, object] | None = None,
    settle_s: float = 0.0,
    auth: str | None = None,
) -> dict[str, float]:
    """Events per request of one checkout's `triage serve` (cascade off, plus `extra` config
    sections): `Ir` (instructions), and with `cache_sim` the cache misses and the cycle estimate.
    Counting goes on for `settle_s` after the last answer."""
    port = free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**triage_config(upstream, port, False, repo), **(extra or {})}))
    out = tmp / f"{name}.callgrind"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--cache-sim={'yes' if cache_sim else 'no'}",
        f"--callgrind-out-file={out}",
        str(PYTHON),
        "-m",
        "router",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    body = api_body(api, model)
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    try:
        wait_port(port, proc, timeout_s=300)
        deadline = time.monotonic() + 120
        while _probe(url + API_PATHS[api], body, headers) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no 200 answer")
            time.sleep(1)
        asyncio.run(_send(url + API_PATHS[api], body, 200, headers))  # warm-up: caches, first-call paths
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_send(url + API_PATHS[api], body, requests, headers))
        time.sleep(settle_s)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        # Written now: a SIGTERM'd server re-raises the signal, and then callgrind writes nothing.
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(120)
    # One file per dump: `totals:` is what counting saw (`summary:` may read 0 in a dump).
    totals: dict[str, int] = {}
    for path in tmp.glob(f"{name}.callgrind*"):
        data = path.read_bytes()
        events = re.search(rb"^events: (.+)$", data, re.MULTILINE)
        names = events.group(1).decode().split() if events else ["Ir"]
        rows = [
            [int(x) for x in found.split()]
            for found in re.findall(rb"^(?:summary|totals): ([\d ]+)$", data, re.MULTILINE)
        ]
        if rows:
            best = max(rows, key=lambda row: row[0])
            for event, value in zip(names, best, strict=False):
                totals[event] = totals.get(event, 0) + value
    per = {"Ir": totals.get("Ir", 0) / requests}
    if cache_sim:
        for label, kinds in _MISSES.items():
            per[label] = sum(totals.get(e, 0) for e in kinds) / requests
        per["cycles (est.)"] = sum(per[k] * w for k, w in _CYCLES.items())
    return per


def _probe(url: str, body: bytes, headers: dict[str, str]) -> int:
    """One POST's status (to wait for the server to answer)."""
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


async def _send(url: str, body: bytes, requests: int, headers: dict[str, str], connections: int = 32) -> None:
    """Exactly `requests` POSTs, `connections` at a time; every answer must be a 200."""
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(n: int) -> None:
            for _ in range(n):
                for attempt in range(3):
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            await resp.read()
                            if resp.status != 200:
                                raise RuntimeError(f"{url} answered {resp.status}")
                        break
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                        # Under valgrind a kept-alive connection can sit idle past the server's
                        # keep-alive timeout; the server closed it before reading the request.
                        if attempt == 2:
                            raise

        share, extra = divmod(requests, connections)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(connections)))


def main(argv: list[str] | None = None) -> int:
    """Count both sides and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="git revision to compare against (sent chat)")
    which.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        help="compare this checkout with the traffic store off and on",
    )
    which.add_argument(
        "--limits",
        action="store_true",
        help="compare this checkout with no key limits, limits in process and limits in Redis",
    )
    p.add_argument("--api", choices=sorted(API_PATHS), default="chat", help="what this checkout is sent")
    p.add_argument("--requests", type=int, default=2000, help="requests counted per side")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files and logs (printed)")
    p.add_argument(
        "--mode",
        choices=("routing", "pinned"),
        default="routing",
        help="routing: model auto (scored); pinned: model student-small (never scored)",
    )
    p.add_argument("--cache-sim", action="store_true", help="also simulate the caches (slower)")
    a = p.parse_args(argv)
    model = "auto" if a.mode == "routing" else STUDENT
    needed = {"nginx": "nginx-light", "valgrind": "valgrind"}
    if a.limits:
        needed["redis-server"] = "redis-server"
    tools = ensure_tools(needed)
    tmp = Path(tempfile.mkdtemp(prefix="triage-instr-"))
    try:
        with CannedUpstream(tools["nginx"], tmp / "nginx", "0") as nginx:
            if a.limits:
                with RedisServer(tools["redis-server"], tmp / "redis", "0") as redis, _limits_env(redis.url):
                    counts = {}
                    for side, extra in (
                        ("no limits", None),
                        ("in process", limits_config(redis=False)),
                        ("Redis", limits_config(redis=True)),
                    ):
                        counts[side] = _count(
                            REPO,
                            nginx.json_url,
                            tmp,
                            side.replace(" ", "-"),
                            a.api,
                            a.requests,
                            model,
                            a.cache_sim,
                            extra,
                            auth=None if extra is None else f"Bearer {BENCH_KEY}",
                        )
            elif a.store is not None:
                with store_section(a.store, tmp) as section:
                    settle = STORE_SETTLE_S
                    base = _count(
                        REPO, nginx.json_url, tmp, "off", a.api, a.requests, model, a.cache_sim, None, settle
                    )
                    this = _count(
                        REPO,
                        nginx.json_url,
                        tmp,
                        "on",
                        a.api,
                        a.requests,
                        model,
                        a.cache_sim,
                        {"store": section},
                        settle,
                    )
                counts = {"store off": base, f"{a.store} on": this}
            else:
                with baseline_checkout(a.baseline, tmp) as checkout:
                    base = _count(
                        checkout, nginx.json_url, tmp, "base", "chat", a.requests, model, a.cache_sim
                    )
                this = _count(REPO, nginx.json_url, tmp, "this", a.api, a.requests, model, a.cache_sim)
                counts = {f"{a.baseline} (chat)": base, f"this ({a.api})": this}
    finally:
        if a.keep:
            print(f"files: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"mode {a.mode}, {a.requests} requests a side; per request, and the ratio to the first side:")
    sides = list(counts)
    first = counts[sides[0]]
    print(f"{'':22} {sides[0]:>16} " + " ".join(f"{side:>16} {'ratio':>7}" for side in sides[1:]))
    for event, value in first.items():
        label = "instructions" if event == "Ir" else event
        cells = " ".join(
            f"{counts[side][event]:16,.0f} {counts[side][event] / value if value else float('nan'):7.3f}"
            for side in sides[1:]
        )
        print(f"{label:22} {value:16,.0f} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
