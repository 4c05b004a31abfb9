"""Instructions per request, counted by callgrind: this checkout against a baseline revision.

Wall-clock numbers on a shared 2-core machine drift by ±15% between runs; an
instruction count does not (valgrind counts the same total for the same binary and
inputs whatever else the machine is doing). Each side runs `triage serve` under
`valgrind --tool=callgrind` with counting off, is warmed up, then counts exactly
`--requests` requests sent over 32 keep-alive connections by an aiohttp client
outside valgrind, and prints instructions per request and their ratio.

    .venv/bin/python bench/instructions.py --baseline d9b51c6
    .venv/bin/python bench/instructions.py --baseline d9b51c6 --api messages   # one API this side

The baseline always sends chat; `--api` picks what this checkout is sent (chat,
responses or messages), so a translated API's cost shows next to chat's.
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
from pathlib import Path

import aiohttp
import yaml
from canned import API_PATHS, REPO, CannedUpstream, api_body, ensure_tools, free_port, wait_port
from gateway import PYTHON, baseline_checkout, probe, triage_config


def _count(repo: Path, upstream: str, tmp: Path, name: str, api: str, requests: int) -> float:
    """Instructions per request of one checkout's `triage serve` (routing mode, cascade off)."""
    port = free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(triage_config(upstream, port, False, repo)))
    out = tmp / f"{name}.callgrind"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
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
    body = api_body(api, "auto")
    try:
        wait_port(port, proc, timeout_s=300)
        deadline = time.monotonic() + 120
        while probe(url, body, API_PATHS[api])[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no 200 answer")
            time.sleep(1)
        asyncio.run(_send(url + API_PATHS[api], body, 200))  # warm-up: caches, first-call paths
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_send(url + API_PATHS[api], body, requests))
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        # Written now: a SIGTERM'd server re-raises the signal, and then callgrind writes nothing.
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(120)
    # One file per dump: `totals:` is what counting saw (`summary:` may read 0 in a dump).
    total = 0
    for path in tmp.glob(f"{name}.callgrind*"):
        found = re.findall(rb"^(?:summary|totals): (\d+)", path.read_bytes(), re.MULTILINE)
        total += max((int(x) for x in found), default=0)
    return total / requests


async def _send(url: str, body: bytes, requests: int, connections: int = 32) -> None:
    """Exactly `requests` POSTs, `connections` at a time; every answer must be a 200."""
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(n: int) -> None:
            for _ in range(n):
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")

        share, extra = divmod(requests, connections)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(connections)))


def main(argv: list[str] | None = None) -> int:
    """Count both sides and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision to compare against (sent chat)")
    p.add_argument("--api", choices=sorted(API_PATHS), default="chat", help="what this checkout is sent")
    p.add_argument("--requests", type=int, default=2000, help="requests counted per side")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files and logs (printed)")
    a = p.parse_args(argv)
    tools = ensure_tools({"nginx": "nginx-light", "valgrind": "valgrind"})
    tmp = Path(tempfile.mkdtemp(prefix="triage-instr-"))
    try:
        with CannedUpstream(tools["nginx"], tmp / "nginx", "0") as nginx:
            with baseline_checkout(a.baseline, tmp) as checkout:
                base = _count(checkout, nginx.json_url, tmp, "base", "chat", a.requests)
            this = _count(REPO, nginx.json_url, tmp, "this", a.api, a.requests)
    finally:
        if a.keep:
            print(f"files: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{a.baseline} (chat): {base:,.0f} instructions/request")
    print(f"this checkout ({a.api}): {this:,.0f} instructions/request ({this / base:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
