"""Gateway overhead benchmark: wrk against nginx directly, then through Triage.

A canned nginx upstream answers every chat completion instantly, so what the
via-Triage numbers add over the direct ones is the gateway's own cost:
requests/s, p50/p99 latency, CPU per request and peak RSS, at fixed connection
counts. With --stream the upstream sends a 43-event SSE body and a small
asyncio client also measures the time to first byte, first event and last byte.

    .venv/bin/python bench/gateway.py                 # routing mode, JSON, full run
    .venv/bin/python bench/gateway.py --mode pinned   # model: student-small, no scoring
    .venv/bin/python bench/gateway.py --stream --quick
    .venv/bin/python bench/gateway.py --apis chat,responses,messages   # each API's overhead
    .venv/bin/python bench/gateway.py --baseline d9b51c6               # this checkout against a commit
    .venv/bin/python bench/gateway.py --store sqlite --connections 32  # traffic store off and on
    .venv/bin/python bench/gateway.py --poll-ui                        # with and without /ui polling
    .venv/bin/python bench/gateway.py --limits --connections 1,32      # key limits: off, in process, Redis

wrk and nginx share core 0, Triage gets core 1 (and up, with --workers).
Numbers from a shared machine are noisy: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from canned import (
    API_PATHS,
    BENCH_DIR,
    REPO,
    CannedUpstream,
    api_body,
    busy_processes,
    chat_body,
    cpu_ticks,
    descendants,
    ensure_tools,
    free_port,
    machine,
    peak_rss_kib,
    stop_group,
    wait_port,
)

PYTHON = REPO / ".venv" / "bin" / "python"
STUDENT = "student-small"


@dataclass
class WrkRun:
    """One wrk run's summary (latencies in microseconds)."""

    requests: int
    duration_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    errors: int
    triage_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s else 0.0


@dataclass
class Row:
    """One connection count: every repeat, direct and via Triage."""

    connections: int
    direct: list[WrkRun] = field(default_factory=list)
    via: list[WrkRun] = field(default_factory=list)
    rss_kib: int = 0


@dataclass
class Settings:
    """What one bench invocation runs."""

    connections: list[int]
    duration_s: int
    repeats: int
    warmup_s: int
    mode: str
    stream: bool
    workers: int | None
    cascade: bool
    stream_requests: int
    apis: list[str] = field(default_factory=lambda: ["chat"])
    baseline: str | None = None
    store: str | None = None
    poll_ui_s: float | None = None
    limits: bool = False


# --- Triage -------------------------------------------------------------------


def _repo_config(checkout: Path) -> dict[str, Any]:
    raw = yaml.safe_load((checkout / "config.yaml").read_text()) or {}
    return raw if isinstance(raw, dict) else {}


def triage_config(upstream: str, port: int, cascade: bool, checkout: Path = REPO) -> dict[str, Any]:
    """One student and the teacher, both on the canned upstream; the checkout's own classifier
    and prices from its config.yaml (a baseline runs with the classifier it shipped)."""
    repo = _repo_config(checkout)
    classifier = dict(repo.get("classifier") or {"kind": "heuristic"})
    if classifier.get("path") and not Path(classifier["path"]).is_absolute():
        classifier["path"] = str((checkout / classifier["path"]).resolve())
    prices = {m.get("name"): m.get("price") for m in repo.get("models") or [] if isinstance(m, dict)}
    student: dict[str, Any] = {
        "name": STUDENT,
        "role": "student",
        "endpoints": [f"{upstream}/v1"],
        "upstream_model": "bench-student",
        "max_score": 0.5,
    }
    teacher: dict[str, Any] = {
        "name": "teacher",
        "role": "teacher",
        "endpoints": [f"{upstream}/v1"],
        "upstream_model": "bench-teacher",
    }
    for model in (student, teacher):
        if prices.get(model["name"]):
            model["price"] = prices[model["name"]]
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": [student, teacher],
        "classifier": classifier,
        "routing": {"alias": "auto", "cascade": {"enabled": cascade}},
    }


def workers_supported() -> bool:
    """Whether this checkout's `triage serve` has a --workers flag."""
    out = subprocess.run(
        [str(PYTHON), "-m", "router", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return "--workers" in out.stdout


class Triage:
    """`triage serve` on a temp config, pinned with taskset, in its own process group."""

    def __init__(
        self,
        workdir: Path,
        upstream: str,
        cores: str,
        workers: int | None,
        cascade: bool,
        repo: Path = REPO,
        name: str = "triage",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / f"{name}.yaml"
        config = {**triage_config(upstream, self.port, cascade, repo), **(extra or {})}
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        # `python -m router` from this folder runs its code (a baseline worktree's, say).
        self.repo = repo
        self.cores = cores
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Triage:
        cmd = [
            "taskset",
            "-c",
            self.cores,
            str(PYTHON),
            "-m",
            "router",
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.repo, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        try:
            wait_port(self.port, self.proc, timeout_s=60)
            self._wait_healthy()
        except BaseException:
            self.stop()
            sys.stderr.write(self.log_path.read_text(errors="replace")[-3000:])
            raise
        return self

    def _wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"triage at {self.url} never answered /healthz") from None
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The serving process and every child (workers)."""
        return descendants(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL whatever is left after 10 s."""
        if self.proc is not None:
            stop_group(self.proc, grace_s=10.0)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe(url: str, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    """One POST: status, headers, body (to check the setup before measuring)."""
    req = urllib.request.Request(url + path, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# --- wrk ------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    connections: int,
    duration_s: int,
    body: bytes,
    core: str,
    measure: Callable[[], float] | None = None,
    path: str = "/v1/chat/completions",
    auth: str | None = None,
) -> WrkRun:
    """One wrk run; `measure` returns CPU seconds of the process under test (read before and after);
    `auth` is sent as the Authorization header."""
    cmd = [
        "taskset",
        "-c",
        core,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "chat.lua"),
        url + path,
    ]
    env = {**os.environ, "BENCH_BODY": body.decode()}
    if auth is not None:
        env["BENCH_AUTH"] = auth
    before = measure() if measure else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    after = measure() if measure else 0.0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    v = {k: float(x) for k, x in (kv.split("=") for kv in line.split()[1:])}
    return WrkRun(
        requests=int(v["requests"]),
        duration_s=v["duration_us"] / 1e6,
        p50_us=v["p50_us"],
        p90_us=v["p90_us"],
        p99_us=v["p99_us"],
        max_us=v["max_us"],
        errors=int(v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"]),
        triage_cpu_s=after - before,
    )


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[Row], title: str) -> None:
    """Medians over repeats; added latency is the median of paired (via - direct) differences."""
    print(f"\n{title}")
    head = (
        f"{'conns':>5} | {'direct rps':>10} {'via rps':>9} {'via/dir':>7} | "
        f"{'dir p50':>8} {'via p50':>8} {'+p50':>8} | {'dir p99':>8} {'via p99':>8} {'+p99':>8} | "
        f"{'CPU ms/req':>10} {'RSS MiB':>7} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        pairs = list(zip(r.direct, r.via, strict=True))
        d_rps, v_rps = _med([x.rps for x in r.direct]), _med([x.rps for x in r.via])
        cpu_ms = _med([v.triage_cpu_s * 1000 / v.requests for v in r.via if v.requests])
        errors = sum(x.errors for x in r.via) + sum(x.errors for x in r.direct)
        print(
            f"{r.connections:>5} | {d_rps:>10.0f} {v_rps:>9.0f} {v_rps / d_rps:>7.3f} | "
            f"{_med([x.p50_us for x in r.direct]):>8.0f} {_med([x.p50_us for x in r.via]):>8.0f} "
            f"{_med([v.p50_us - d.p50_us for d, v in pairs]):>8.0f} | "
            f"{_med([x.p99_us for x in r.direct]):>8.0f} {_med([x.p99_us for x in r.via]):>8.0f} "
            f"{_med([v.p99_us - d.p99_us for d, v in pairs]):>8.0f} | "
            f"{cpu_ms:>10.3f} {r.rss_kib / 1024:>7.1f} {errors:>6}"
        )
    print(
        "latencies in µs; rps = requests/s; CPU = Triage user+sys per request; "
        "RSS = Triage peak (VmHWM, all processes)"
    )


def wrk_table(s: Settings, wrk: str, upstream: str, triage: Triage, body: bytes, load_core: str) -> list[Row]:
    """Every connection count: warm-up, then `repeats` back-to-back direct/via pairs."""
    rows = []
    for conns in s.connections:
        row = Row(conns)
        run_wrk(wrk, upstream, conns, s.warmup_s, body, load_core)
        run_wrk(wrk, triage.url, conns, s.warmup_s, body, load_core)
        for _ in range(s.repeats):
            row.direct.append(run_wrk(wrk, upstream, conns, s.duration_s, body, load_core))
            row.via.append(
                run_wrk(
                    wrk,
                    triage.url,
                    conns,
                    s.duration_s,
                    body,
                    load_core,
                    measure=lambda: cpu_ticks(triage.pids()),
                )
            )
        row.rss_kib = peak_rss_kib(triage.pids())
        v = row.via[-1]
        print(
            f"  c={conns}: direct {_med([x.rps for x in row.direct]):.0f} rps, "
            f"via {_med([x.rps for x in row.via]):.0f} rps (last: {v.requests} requests, "
            f"{v.errors} errors)",
            flush=True,
        )
        rows.append(row)
    return rows


# --- each API, and this checkout against a baseline --------------------------------


@dataclass
class Side:
    """One series of via-Triage runs (an API, or a checkout)."""

    label: str
    runs: list[WrkRun] = field(default_factory=list)


def _side_rows(title: str, conns: int, sides: list[Side]) -> None:
    base = sides[0]
    b_rps = _med([x.rps for x in base.runs])
    b_p50 = _med([x.p50_us for x in base.runs])
    print(f"  {title}, c={conns}:")
    for side in sides:
        rps = _med([x.rps for x in side.runs])
        p50 = _med([x.p50_us for x in side.runs])
        p99 = _med([x.p99_us for x in side.runs])
        cpu = _med([x.triage_cpu_s * 1000 / x.requests for x in side.runs if x.requests])
        errors = sum(x.errors for x in side.runs)
        print(
            f"    {side.label:>12}: {rps:>7.0f} rps ({rps / b_rps:.3f}x {base.label}) | p50 {p50:>6.0f} µs "
            f"({p50 - b_p50:+.0f}) | p99 {p99:>6.0f} µs | CPU {cpu:.3f} ms/req | errors {errors}"
        )


def api_table(s: Settings, wrk: str, triage: Triage, model: str, load_core: str) -> dict[str, Any]:
    """Each API through the same Triage, rounds interleaved so drift hits all alike."""
    out: dict[str, Any] = {}
    bodies = {api: api_body(api, model, stream=s.stream) for api in s.apis}
    for api, body in bodies.items():
        status, _, reply = probe(triage.url, body, API_PATHS[api])
        if status != 200:
            raise RuntimeError(f"{api}: Triage answered {status}: {reply[:300]!r}")
    print(f"\nper API, via Triage (rounds interleaved; first API is the reference): {', '.join(s.apis)}")
    for conns in s.connections:
        sides = [Side(api) for api in s.apis]
        for side in sides:
            run_wrk(
                wrk, triage.url, conns, s.warmup_s, bodies[side.label], load_core, path=API_PATHS[side.label]
            )
        for _ in range(s.repeats):
            for side in sides:
                side.runs.append(
                    run_wrk(
                        wrk,
                        triage.url,
                        conns,
                        s.duration_s,
                        bodies[side.label],
                        load_core,
                        measure=lambda: cpu_ticks(triage.pids()),
                        path=API_PATHS[side.label],
                    )
                )
        _side_rows("APIs", conns, sides)
        out[str(conns)] = {side.label: [asdict(r) for r in side.runs] for side in sides}
    return out


@contextmanager
def baseline_checkout(rev: str, tmp: Path) -> Iterator[Path]:
    """A detached worktree of `rev`, removed afterwards (it shares this checkout's venv)."""
    path = tmp / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
        )


def alternating_table(
    s: Settings,
    wrk: str,
    title: str,
    what: str,
    servers: list[tuple[str, Triage]],
    body: bytes,
    load_core: str,
    auth: str | None = None,
) -> dict[str, Any]:
    """Several Triage processes under the same load, rounds alternating so drift hits all alike;
    the first is the reference of the printed ratios. `auth` goes to every side (a gateway
    without keys ignores it)."""
    out: dict[str, Any] = {}
    print(f"\n{title}")
    for conns in s.connections:
        sides = [(Side(label), server) for label, server in servers]
        for _, server in sides:
            run_wrk(wrk, server.url, conns, s.warmup_s, body, load_core, auth=auth)
        for _ in range(s.repeats):
            for side, server in sides:
                side.runs.append(
                    run_wrk(
                        wrk,
                        server.url,
                        conns,
                        s.duration_s,
                        body,
                        load_core,
                        measure=lambda server=server: cpu_ticks(server.pids()),  # type: ignore[misc]
                        auth=auth,
                    )
                )
        _side_rows(what, conns, [side for side, _ in sides])
        out[str(conns)] = {side.label: [asdict(r) for r in side.runs] for side, _ in sides}
    return out


def baseline_table(
    s: Settings, wrk: str, triage: Triage, base: Triage, body: bytes, load_core: str
) -> dict[str, Any]:
    """This checkout against the baseline, chat only, rounds alternating."""
    return alternating_table(
        s,
        wrk,
        f"this checkout against {s.baseline} (chat, rounds alternating)",
        "checkouts",
        [(s.baseline or "baseline", base), ("this", triage)],
        body,
        load_core,
    )


# --- the traffic store on and off ------------------------------------------------------

BENCH_STORE_DSN_ENV = "TRIAGE_BENCH_STORE_DSN"


@contextmanager
def store_section(kind: str, workdir: Path) -> Iterator[dict[str, Any]]:
    """The `store:` config of a bench run: SQLite in `workdir`, or a PostgreSQL server started here
    (Debian's binaries, as the tests run it) whose DSN the Triage process inherits."""
    if kind == "sqlite":
        yield {"kind": "sqlite", "data_dir": str(workdir / "store")}
        return
    sys.path.insert(0, str(REPO))
    from tests.store.postgres import find_bindir, postgres_server

    bindir = find_bindir()
    if bindir is None:
        sys.exit("bench: --store postgres needs PostgreSQL (bash tests/setup.sh installs it)")
    with postgres_server(bindir) as server:
        os.environ[BENCH_STORE_DSN_ENV] = server.dsn()
        try:
            yield {"kind": "postgres", "dsn_env": BENCH_STORE_DSN_ENV}
        finally:
            os.environ.pop(BENCH_STORE_DSN_ENV, None)


def _metric_sum(text: str, name: str) -> float:
    """The sum of a metric's samples in /metrics text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def store_table(
    s: Settings,
    wrk: str,
    workdir: Path,
    upstream: str,
    cores: str,
    workers: int | None,
    triage: Triage,
    body: bytes,
    load_core: str,
) -> dict[str, Any]:
    """The same config with the traffic store off and on (`--store`), rounds alternating."""
    assert s.store is not None
    with store_section(s.store, workdir) as section:
        stored = Triage(workdir, upstream, cores, workers, s.cascade, name="stored")
        config = yaml.safe_load(stored.config_path.read_text())
        stored.config_path.write_text(yaml.safe_dump({**config, "store": section}))
        with stored:
            status, _, reply = probe(stored.url, body)
            if status != 200:
                raise RuntimeError(f"Triage with the store answered {status}: {reply[:300]!r}")
            out = alternating_table(
                s,
                wrk,
                f"traffic store ({s.store}) off and on, rounds alternating (goal: on >= 0.90x off)",
                "store",
                [("store off", triage), (f"{s.store} on", stored)],
                body,
                load_core,
            )
            with urllib.request.urlopen(stored.url + "/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
        written = _metric_sum(metrics, "triage_store_written_records_total")
        dropped = _metric_sum(metrics, "triage_store_dropped_records_total")
        print(f"    store: {written:.0f} records written before the last scrape, {dropped:.0f} dropped")
        out["written"], out["dropped"] = written, dropped
    return out


# --- key limits: off, in process, in Redis -------------------------------------------

BENCH_KEYS_ENV = "TRIAGE_BENCH_KEYS"
BENCH_REDIS_ENV = "TRIAGE_BENCH_REDIS_URL"
BENCH_KEY = "sk-bench"
# Limits every request passes (the point is their cost, not refusals): one of each kind.
BENCH_LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "budget_usd": 10**9}


def limits_config(redis: bool) -> dict[str, Any]:
    """The config sections for one key with every limit on, kept in Redis or in process."""
    extra: dict[str, Any] = {"auth": {"keys_env": BENCH_KEYS_ENV, "limits": BENCH_LIMITS}}
    if redis:
        # A generous timeout: on a loaded machine a Redis call that timed out would be skipped
        # (fail_open, cheaper than a round trip) instead of measured.
        extra["state"] = {"redis_url_env": BENCH_REDIS_ENV, "timeout_s": 2.0}
    return extra


class RedisServer:
    """redis-server on a free port, pinned with taskset, append-only (fsync a second) as deployed."""

    def __init__(self, binary: str, workdir: Path, cores: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.cores = cores
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["taskset", "-c", self.cores, self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", str(self.workdir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, self.proc, timeout_s=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=5.0)


def limits_table(
    s: Settings, wrk: str, servers: list[tuple[str, Triage]], body: bytes, load_core: str
) -> dict[str, Any]:
    """No limits, limits in process, limits in Redis (in that order): rounds interleaved, then what
    Redis adds at the p50 over limits in process and its throughput against no limits."""
    out = alternating_table(
        s,
        wrk,
        "key limits (requests, tokens and budget on one key), rounds interleaved",
        "limits",
        servers,
        body,
        load_core,
        auth=f"Bearer {BENCH_KEY}",
    )
    off, local, redis = (label for label, _ in servers)
    for conns, sides in out.items():
        p50 = {label: _med([r["p50_us"] for r in runs]) for label, runs in sides.items()}
        rps = {label: _med([r["requests"] / r["duration_s"] for r in runs]) for label, runs in sides.items()}
        print(
            f"    c={conns}: Redis on adds {p50[redis] - p50[local]:+.0f} µs at p50 over limits in process "
            f"(goal <= 100); throughput {rps[redis] / rps[off]:.3f}x no limits (goal >= 0.9)"
        )
    return out


async def _alternating_latency(
    ports: list[int], body: bytes, auth: str, n: int, warmup: int
) -> list[list[float]]:
    """Sequential JSON requests, one keep-alive connection per server, taking turns request by
    request so every server sees the same machine noise; seconds per request, per server."""
    conns = [_Conn(port, body, auth, stream=False) for port in ports]
    out: list[list[float]] = [[] for _ in ports]
    try:
        for i in range(warmup + n):
            for conn, times in zip(conns, out, strict=True):
                timing = await conn.one()
                if i >= warmup:
                    times.append(timing.last_byte)
    finally:
        for conn in conns:
            await conn.close()
    return out


def print_alternating_latency(labels: list[str], times: list[list[float]]) -> dict[str, Any]:
    """p50 and p99 of each server's turn-by-turn latencies, and Redis's p50 over in process."""
    print(
        f"\nlatency, {len(times[0])} sequential requests each, servers taking turns request by request (µs)"
    )
    p50s = {}
    for label, ts in zip(labels, times, strict=True):
        us = [t * 1e6 for t in ts]
        p50s[label] = _med(us)
        print(f"  {label:>12}: p50 {p50s[label]:>7.0f}  p99 {statistics.quantiles(us, n=100)[98]:>7.0f}")
    off, local, redis = labels
    print(
        f"  Redis on adds {p50s[redis] - p50s[local]:+.0f} µs at p50 over limits in process "
        f"({p50s[redis] - p50s[off]:+.0f} over no limits; goal <= 100)"
    )
    return dict(zip(labels, times, strict=True))


# --- a dashboard polling ------------------------------------------------------------


class UiPoller:
    """A dashboard left open: GETs /ui/api/summary every `every_s` seconds from a thread."""

    def __init__(self, url: str, every_s: float) -> None:
        self.url = url + "/ui/api/summary"
        self.every_s = every_s
        self.errors = 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    resp.read()
                self.seconds.append(time.perf_counter() - started)
            except OSError:
                self.errors += 1
            self._stop.wait(max(0.0, self.every_s - (time.perf_counter() - started)))

    def __enter__(self) -> UiPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def poll_table(s: Settings, wrk: str, triage: Triage, body: bytes, load_core: str) -> dict[str, Any]:
    """The same Triage with and without a dashboard polling it, rounds alternating."""
    assert s.poll_ui_s is not None
    every = s.poll_ui_s
    out: dict[str, Any] = {}
    print(f"\ndashboard polling: /ui/api/summary every {every:g} s in the 'poll' runs, rounds alternating")
    for conns in s.connections:
        quiet, polled = Side("no poll"), Side(f"poll {every:g}s")
        seconds: list[float] = []
        run_wrk(wrk, triage.url, conns, s.warmup_s, body, load_core)
        for _ in range(s.repeats):
            for side in (quiet, polled):
                poller = UiPoller(triage.url, every) if side is polled else None
                with poller if poller is not None else nullcontext():
                    side.runs.append(
                        run_wrk(
                            wrk,
                            triage.url,
                            conns,
                            s.duration_s,
                            body,
                            load_core,
                            measure=lambda: cpu_ticks(triage.pids()),
                        )
                    )
                if poller is not None:
                    seconds += poller.seconds
                    if poller.errors:
                        print(f"    {poller.errors} dashboard polls failed")
        _side_rows("dashboard polling", conns, [quiet, polled])
        # Each poll run follows its quiet run: the median of those pairs' ratios is less
        # swayed by drift on a shared machine than the ratio of the two medians.
        pairs = [b.rps / a.rps for a, b in zip(quiet.runs, polled.runs, strict=True) if a.rps]
        if pairs:
            print(
                f"    paired ratio (poll / no poll, {len(pairs)} back-to-back pairs): median "
                f"{statistics.median(pairs):.3f}, range {min(pairs):.3f}-{max(pairs):.3f}"
            )
        if seconds:
            print(
                f"    {len(seconds)} polls answered under load: median "
                f"{1000 * statistics.median(seconds):.1f} ms, max {1000 * max(seconds):.1f} ms"
            )
        out[str(conns)] = {side.label: [asdict(r) for r in side.runs] for side in (quiet, polled)}
    return out


# --- streaming latency ----------------------------------------------------------


@dataclass
class StreamTiming:
    """Seconds from sending the request to the response's first byte, first event and last byte."""

    first_byte: float
    first_event: float
    last_byte: float


class _Conn:
    """One keep-alive HTTP/1.1 connection that reads Content-Length or chunked replies."""

    def __init__(self, port: int, body: bytes, auth: str | None = None, stream: bool = True) -> None:
        self.port = port
        self.stream = stream
        self.request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            + (b"Authorization: " + auth.encode() + b"\r\n" if auth else b"")
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def one(self) -> StreamTiming:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        r, w = self.reader, self.writer
        t0 = time.perf_counter()
        w.write(self.request)
        head = await r.readuntil(b"\r\n\r\n")
        t_head = time.perf_counter()
        status = int(head.split(b" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:] if ln)
        }
        body = bytearray()
        t_event = 0.0
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                body += (await r.readexactly(size + 2))[:-2]
                if not t_event and b"data:" in body:
                    t_event = time.perf_counter()
        else:
            left = int(headers.get(b"content-length", b"0"))
            while left:
                chunk = await r.read(min(left, 65536))
                if not chunk:
                    raise ConnectionError("connection closed mid-body")
                left -= len(chunk)
                body += chunk
                if not t_event and b"data:" in body:
                    t_event = time.perf_counter()
        t_end = time.perf_counter()
        if status != 200 or self.stream and not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"bad stream reply {status}: {bytes(body[-200:])!r}")
        return StreamTiming(t_head - t0, (t_event or t_end) - t0, t_end - t0)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _stream_latency(
    direct_port: int, via_port: int, body: bytes, n: int, warmup: int
) -> tuple[list[StreamTiming], list[StreamTiming]]:
    direct, via = _Conn(direct_port, body), _Conn(via_port, body)
    out: tuple[list[StreamTiming], list[StreamTiming]] = ([], [])
    try:
        for i in range(warmup + n):
            # Alternate so both sides see the same machine noise.
            d, v = await direct.one(), await via.one()
            if i >= warmup:
                out[0].append(d)
                out[1].append(v)
    finally:
        await direct.close()
        await via.close()
    return out


def print_stream_latency(direct: list[StreamTiming], via: list[StreamTiming]) -> None:
    """Medians and p99 of each timing, and what Triage adds."""
    print(
        f"\nStreaming latency, {len(via)} sequential requests each way, alternating "
        "(one keep-alive connection each; µs)"
    )
    head = f"{'':>12} | {'dir p50':>8} {'via p50':>8} {'+p50':>8} | {'dir p99':>8} {'via p99':>8} {'+p99':>8}"
    print(head)
    print("-" * len(head))
    for name in ("first_byte", "first_event", "last_byte"):
        d = [getattr(t, name) * 1e6 for t in direct]
        v = [getattr(t, name) * 1e6 for t in via]
        dq, vq = statistics.quantiles(d, n=100), statistics.quantiles(v, n=100)
        print(
            f"{name:>12} | {_med(d):>8.0f} {_med(v):>8.0f} {_med(v) - _med(d):>8.0f} | "
            f"{dq[98]:>8.0f} {vq[98]:>8.0f} {vq[98] - dq[98]:>8.0f}"
        )
    print("first_byte = response headers; first_event = first `data:` bytes; last_byte = end of body")


# --- main -------------------------------------------------------------------------


def _cores(workers: int | None) -> tuple[str, str, str]:
    """(load generator + nginx cores, Triage cores, a note when they overlap)."""
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        return "0", "0", "only one usable core: wrk, nginx and Triage share it"
    want = workers or 1
    triage = list(range(1, min(ncpu, 1 + want)))
    note = ""
    if want > len(triage):
        note = f"{want} workers share {len(triage)} core(s) ({ncpu} usable in all)"
    return "0", ",".join(map(str, triage)), note


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _git_version() -> str:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


def run(s: Settings, json_out: Path | None) -> int:
    """Start nginx and Triage, run every table, stop both."""
    needed = {"nginx": "nginx-light", "wrk": "wrk", "taskset": "util-linux"}
    if s.limits:
        needed["redis-server"] = "redis-server"
    tools = ensure_tools(needed)
    if not PYTHON.exists():
        sys.exit(f"bench: {PYTHON} not found; run `bash tests/setup.sh` first")
    workers = s.workers
    if workers is not None and not workers_supported():
        if workers > 1:
            print(
                f"bench: `triage serve` has no --workers flag in this checkout; "
                f"skipping the --workers {workers} run"
            )
            return 0
        workers = None
    load_core, triage_cores, note = _cores(workers)
    model = "auto" if s.mode == "routing" else STUDENT
    body = chat_body(model, stream=s.stream)

    print(f"machine: {machine()}")
    print(f"triage: {_git_version()}; python {sys.version.split()[0]}")
    busy = busy_processes()
    print(
        f"other busy processes (>10% of a core): {', '.join(busy) if busy else 'none'}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"cores: wrk + nginx on {load_core}, Triage on {triage_cores}"
        + (f" (workers {workers})" if workers else "")
        + (f"; note: {note}" if note else "")
    )
    print(
        f"mode: {s.mode} (model {model!r}); {'streaming' if s.stream else 'non-streaming'}; "
        f"cascade {'on' if s.cascade else 'off'}; classifier "
        f"{triage_config('http://x', 0, False)['classifier']}"
    )
    print(
        f"load: wrk -t1, connections {s.connections}, {s.duration_s} s x {s.repeats} repeats "
        f"(+{s.warmup_s} s warm-up each side), body {len(body)} bytes",
        flush=True,
    )

    results: dict[str, Any] = {"machine": machine(), "settings": asdict(s)}
    with (
        tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp,
        _sigterm_as_interrupt(),
        CannedUpstream(tools["nginx"], Path(tmp) / "nginx", load_core) as nginx,
    ):
        upstream = nginx.sse_url if s.stream else nginx.json_url
        with Triage(Path(tmp), upstream, triage_cores, workers, s.cascade) as triage:
            status, headers, reply = probe(triage.url, body)
            lower = {k.lower(): v for k, v in headers.items()}
            print(
                f"probe: {status}; x-triage-model={lower.get('x-triage-model')} "
                f"x-triage-reason={lower.get('x-triage-reason')} "
                f"x-triage-score={lower.get('x-triage-score', '-')}; {len(reply)} bytes"
            )
            if status != 200:
                print(f"bench: Triage answered {status}: {reply[:500]!r}", file=sys.stderr)
                return 1
            print(
                f"Triage pids {triage.pids()}, RSS after start {peak_rss_kib(triage.pids()) / 1024:.1f} MiB",
                flush=True,
            )
            rows = wrk_table(s, tools["wrk"], upstream, triage, body, load_core)
            kind = "streaming (SSE, whole body at once)" if s.stream else "non-streaming JSON"
            print_table(
                rows,
                f"wrk -t1, {kind}, mode {s.mode}, cascade "
                f"{'on' if s.cascade else 'off'}: direct = wrk -> nginx, "
                "via = wrk -> Triage -> nginx",
            )
            results["wrk"] = [asdict(r) for r in rows]
            if s.apis != ["chat"]:
                results["apis"] = api_table(s, tools["wrk"], triage, model, load_core)
            if s.poll_ui_s is not None:
                results["poll_ui"] = poll_table(s, tools["wrk"], triage, body, load_core)
            if s.baseline is not None:
                with (
                    baseline_checkout(s.baseline, Path(tmp)) as checkout,
                    Triage(Path(tmp), upstream, triage_cores, workers, s.cascade, checkout, "base") as base,
                ):
                    results["baseline"] = baseline_table(s, tools["wrk"], triage, base, body, load_core)
            if s.store is not None:
                results["store"] = store_table(
                    s, tools["wrk"], Path(tmp), upstream, triage_cores, workers, triage, body, load_core
                )
            if s.limits:
                with (
                    RedisServer(tools["redis-server"], Path(tmp) / "redis", load_core) as redis,
                    _limits_env(redis.url),
                    Triage(
                        Path(tmp),
                        upstream,
                        triage_cores,
                        workers,
                        s.cascade,
                        name="local",
                        extra=limits_config(redis=False),
                    ) as local,
                    Triage(
                        Path(tmp),
                        upstream,
                        triage_cores,
                        workers,
                        s.cascade,
                        name="redis",
                        extra=limits_config(redis=True),
                    ) as shared,
                ):
                    auth = f"Bearer {BENCH_KEY}"
                    for server in (local, shared):
                        req = urllib.request.Request(
                            server.url + "/v1/chat/completions",
                            data=body,
                            headers={"content-type": "application/json", "authorization": auth},
                        )
                        with urllib.request.urlopen(req, timeout=10) as resp:
                            assert resp.status == 200
                    sides = [("no limits", triage), ("in process", local), ("Redis", shared)]
                    results["limits"] = limits_table(s, tools["wrk"], sides, body, load_core)
                    os.sched_setaffinity(0, {int(load_core)})
                    times = asyncio.run(
                        _alternating_latency(
                            [server.port for _, server in sides], body, auth, s.stream_requests, warmup=50
                        )
                    )
                    results["limits_latency"] = print_alternating_latency(
                        [label for label, _ in sides], times
                    )
            if s.stream:
                os.sched_setaffinity(0, {int(load_core)})
                d, v = asyncio.run(
                    _stream_latency(
                        nginx.sse_port,
                        triage.port,
                        body,
                        s.stream_requests,
                        warmup=min(20, s.stream_requests),
                    )
                )
                print_stream_latency(d, v)
                results["stream_latency"] = {"direct": [asdict(t) for t in d], "via": [asdict(t) for t in v]}
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(f"\nraw results: {json_out}")
    return 0


@contextmanager
def _limits_env(redis_url: str) -> Iterator[None]:
    """The bench key and the Redis URL in the environment the Triage processes inherit."""
    saved = {k: os.environ.get(k) for k in (BENCH_KEYS_ENV, BENCH_REDIS_ENV)}
    os.environ[BENCH_KEYS_ENV] = f"bench:{BENCH_KEY}"
    os.environ[BENCH_REDIS_ENV] = redis_url
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _connections(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be positive")
    return values


def main(argv: list[str] | None = None) -> int:
    """Parse options and run the bench."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--connections",
        type=_connections,
        default=[1, 8, 32, 128],
        help="comma-separated wrk connection counts (default 1,8,32,128)",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="direct/via pairs per connection count")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per side and count")
    p.add_argument(
        "--mode",
        choices=["routing", "pinned"],
        default="routing",
        help="routing: model auto, classifier scores each request; pinned: model student-small, no scoring",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="stream: SSE upstream, stream=true requests, plus TTFB/TTLB table",
    )
    p.add_argument(
        "--stream-requests",
        type=int,
        default=300,
        help="sequential requests each way for the streaming latency table (and each server's share "
        "of the --limits latency table)",
    )
    p.add_argument("--workers", type=int, help="pass --workers N to `triage serve`")
    p.add_argument("--cascade", action="store_true", help="keep routing.cascade enabled")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat of 3 s, 1 s warm-up")
    p.add_argument("--json", type=Path, help="also write raw results to this file")
    p.add_argument(
        "--apis",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=["chat"],
        help="also compare these APIs through Triage, e.g. chat,responses,messages (first = reference)",
    )
    p.add_argument("--baseline", help="also run this git revision's Triage and compare (chat)")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        help="also compare Triage with the traffic store off and on (postgres: a server started here)",
    )
    p.add_argument(
        "--poll-ui",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="also compare Triage with and without a dashboard polling /ui/api/summary every SECONDS "
        "(default 2, the page's own rate), rounds alternating",
    )
    p.add_argument(
        "--limits",
        action="store_true",
        help="also compare one key with every limit on, in process and in Redis (redis-server), "
        "against no limits",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.repeats, a.warmup = 3, 1, 1
        a.stream_requests = min(a.stream_requests, 100)
    s = Settings(
        connections=a.connections,
        duration_s=a.duration,
        repeats=a.repeats,
        warmup_s=a.warmup,
        mode=a.mode,
        stream=a.stream,
        workers=a.workers,
        cascade=a.cascade,
        stream_requests=a.stream_requests,
        apis=a.apis,
        baseline=a.baseline,
        store=a.store,
        poll_ui_s=a.poll_ui,
        limits=a.limits,
    )
    try:
        return run(s, a.json)
    except KeyboardInterrupt:
        print("\nbench: interrupted; nginx and Triage stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
