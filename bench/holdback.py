"""Time-to-first-token cost of the streaming quality hold-back, on the real local CPU models.

Starts the local llama-servers (deploy/local/models.sh) and `triage serve` with the shipped
config.yaml, then streams the same easy prompt N times with the hold-back on (the default:
8 events or 300 ms) and N times with it off (`x-triage-fallback: off`), alternating, and prints
the median and p90 time to the first content event for both. Prints numbers; asserts nothing.

    .venv/bin/python bench/holdback.py [--requests 20] [--hold-back-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "deploy" / "local" / "models.sh"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _first_token_s(client: httpx.Client, headers: dict[str, str]) -> float:
    body = {
        "model": "auto",
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello to my friend Sam."}],
    }
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - start
                for _ in lines:  # read the rest so the connection is reused
                    pass
                return first
    raise RuntimeError("no content event")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--hold-back-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sport, tport, gport = _free_port(), _free_port(), _free_port()
        env = {
            **os.environ,
            "TRIAGE_STUDENT_PORT": str(sport),
            "TRIAGE_TEACHER_PORT": str(tport),
            "TRIAGE_RUN_DIR": tmp,
        }
        started = subprocess.run(["bash", str(MODELS), "start"], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            print(
                f"cannot start the local models (run `bash deploy/local/setup.sh`):\n{started.stderr}",
                file=sys.stderr,
            )
            return 2
        raw = yaml.safe_load((REPO / "config.yaml").read_text())
        raw["models"][0]["endpoints"] = [f"http://127.0.0.1:{sport}/v1"]
        raw["models"][1]["endpoints"] = [f"http://127.0.0.1:{tport}/v1"]
        raw["classifier"]["path"] = str(REPO / raw["classifier"]["path"])
        raw.setdefault("routing", {})["cascade"] = {"hold_back_tokens": args.hold_back_tokens}
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(gport),
                "--log-level",
                "warning",
            ]
        )
        try:
            url = f"http://127.0.0.1:{gport}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            on: list[float] = []
            off: list[float] = []
            with httpx.Client(base_url=url, timeout=60) as client:
                _first_token_s(client, {})  # warm-up
                for _ in range(args.requests):
                    on.append(_first_token_s(client, {}))
                    off.append(_first_token_s(client, {"x-triage-fallback": "off"}))

            def row(name: str, xs: list[float]) -> str:
                xs = sorted(xs)
                p90 = xs[int(0.9 * (len(xs) - 1))]
                return f"{name:>28} | {statistics.median(xs) * 1000:8.1f} | {p90 * 1000:8.1f}"

            print(
                f"local student (SmolLM2-135M on llama-server, CPU); {args.requests} streams "
                "each, alternating"
            )
            print(f"{'time to first content event':>28} | p50 ms   | p90 ms")
            print(row(f"hold-back {args.hold_back_tokens} events/300 ms", on))
            print(row("hold-back off", off))
            cost = statistics.median(on) - statistics.median(off)
            print(f"{'cost of the window':>28} | {cost * 1000:8.1f} |")
        finally:
            gateway.terminate()
            gateway.wait(30)
            subprocess.run(["bash", str(MODELS), "stop"], env=env, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
