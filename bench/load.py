"""Load test: push many requests through a real `triage serve` while the student fails 10% of them.

Everything runs on 127.0.0.1. This process hosts two fast fake upstreams (a
student that injects faults and a teacher that never fails) and a raw-socket
HTTP/1.1 client; the gateway runs as a `triage serve` subprocess with a
generated config. Every request carries a marker (`x-request-id: r<i>` and a
nonce `#n<i>` in the prompt) that the upstream echoes in its answer, so the
client can prove each response belongs to its own request.

Invariants (exit 1 when any fails):
- every request gets exactly one 200 whose content carries its own marker
  (no lost, duplicated, mismatched or non-200 answers);
- the student saw every request once; the teacher saw exactly the faulted ones;
- `triage_fallbacks_total{reason="upstream_error"}` and
  `triage_upstream_errors_total` equal the faults the student injected;
- with `--store-dir`, the traffic store (SQLite) holds exactly one row per request,
  read back after the gateway's clean shutdown, and its fallback rows match the faults.

    .venv/bin/python bench/load.py --requests 50000 --concurrency 96
    .venv/bin/python bench/load.py --requests 50000 --store-dir /tmp/triage-load-store
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "FakeModel",
    "Driver",
    "LoadReport",
    "StoreCount",
    "Tally",
    "fault_kind",
    "free_port",
    "gateway_config",
    "main",
    "run_load",
    "triage_serve",
]

REPO = Path(__file__).resolve().parent.parent
_NONCE = re.compile(rb"#n(\d+)")
_TRIAGE = [sys.executable, "-m", "router"]


def fault_kind(i: int, every: int, reset_every: int) -> str | None:
    """The fault the student injects for request `i`: None, "status" (HTTP 500) or "reset".

    Deterministic, so the client knows in advance which requests must fall back:
    one in `every` requests fails; of those, one in `reset_every` is a TCP reset.
    """
    if every <= 0 or i % every != every // 2:
        return None
    return "reset" if reset_every > 0 and (i // every) % reset_every == 0 else "status"


# --------------------------------------------------------------------------- upstream


@dataclass
class FakeModel:
    """State of one fake upstream: who it is, which faults it injects, what it saw."""

    name: str
    fault_every: int = 0
    reset_every: int = 0
    seen: dict[int, int] = field(default_factory=dict)  # request index -> times received
    injected: dict[str, int] = field(default_factory=lambda: {"status": 0, "reset": 0})
    bad_requests: int = 0

    @property
    def faults(self) -> int:
        """All faults injected so far."""
        return self.injected["status"] + self.injected["reset"]


class _UpstreamProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server: keep-alive, Content-Length bodies, no chunked requests."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            headers = {}
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self._answer(headers.get("x-request-id", ""), body)

    def _answer(self, request_id: str, body: bytes) -> None:
        model, transport = self.model, self.transport
        assert transport is not None
        nonce = _NONCE.search(body)
        if not request_id.startswith("r") or nonce is None:
            model.bad_requests += 1
            self._send(
                400,
                b'{"error": {"message": "no marker", "type": "invalid_request_error", '
                b'"param": null, "code": null}}',
            )
            return
        index = int(request_id[1:])
        model.seen[index] = model.seen.get(index, 0) + 1
        fault = fault_kind(index, model.fault_every, model.reset_every)
        if fault == "reset":
            model.injected["reset"] += 1
            sock = transport.get_extra_info("socket")
            # SO_LINGER with a zero timeout makes close() send a TCP reset.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            self.transport = None
            return
        if fault == "status":
            model.injected["status"] += 1
            self._send(
                500, b'{"error": {"message": "injected", "type": "server_error", "param": null, "code": 500}}'
            )
            return
        content = f"{model.name} {request_id} n{nonce.group(1).decode()}"
        self._send(
            200,
            orjson.dumps(
                {
                    "id": "cmpl-" + request_id,
                    "object": "chat.completion",
                    "created": 0,
                    "model": model.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                }
            ),
        )

    def _send(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        reason = "OK" if status == 200 else "Error"
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )


async def _serve_fake(model: FakeModel) -> tuple[asyncio.Server, str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _UpstreamProtocol(model), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- gateway


def gateway_config(student_url: str, teacher_url: str, port: int) -> dict[str, Any]:
    """A config that makes fallback counts exact: one student endpoint, breaker and budget out of the way."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": [
            {
                "name": "student-small",
                "role": "student",
                "endpoints": [student_url + "/v1"],
                "upstream_model": "up-small",
                "max_score": 0.9,
                "max_connections": 512,
            },
            {
                "name": "teacher",
                "role": "teacher",
                "endpoints": [teacher_url + "/v1"],
                "upstream_model": "up-teacher",
                "max_connections": 512,
            },
        ],
        "classifier": {"kind": "heuristic"},
        "routing": {
            "alias": "auto",
            # A failed student attempt has no second endpoint: it goes straight to the teacher.
            "retries_per_model": 1,
            # The breaker must never divert a request, or fallbacks would not match faults.
            "breaker_failures": 1_000_000_000,
            "retry_budget_ratio": 0.5,
            "retry_budget_burst": 1000,
            "cascade": {"enabled": False},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def triage_serve(config: dict[str, Any], log: Path | None = None) -> Iterator[tuple[str, int]]:
    """Run `triage serve` on a generated config; yield (base URL, pid). Always stops it."""
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        port = config["server"]["port"]
        out = open(log or Path(tmp) / "gateway.log", "wb")
        proc = subprocess.Popen(
            [*_TRIAGE, "serve", "--config", str(path), "--log-level", "warning", "--drain-timeout-s", "2"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(port, proc, Path(out.name))
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            out.close()


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"triage serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("triage serve did not become healthy within 30 s")


# --------------------------------------------------------------------------- client


@dataclass
class Tally:
    """What the client saw, per request index."""

    ok: dict[int, int] = field(default_factory=dict)  # index -> 200s whose content matched
    latencies: list[float] = field(default_factory=list)
    non200: dict[int, int] = field(default_factory=dict)  # status -> count
    mismatched: int = 0
    lost: int = 0  # no response at all (transport error or timeout)
    wrong_model: int = 0  # the student answered a faulted request or the teacher an unfaulted one
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ValueError(f"response without content-length: {lines[0]}")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def _worker(
    host: str,
    port: int,
    next_index: Callable[[], int | None],
    tally: Tally,
    fault_every: int,
    reset_every: int,
    timeout_s: float,
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while (i := next_index()) is not None:
            body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": f"say hi #n{i}"}]})
            request = (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
                f"content-type: application/json\r\nx-request-id: r{i}\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode() + body
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(request)
                status, headers, content = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
                TimeoutError,
            ) as exc:
                tally.lost += 1
                tally.note(f"request {i}: no response ({type(exc).__name__}: {exc})")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            tally.latencies.append(time.perf_counter() - started)
            if status != 200:
                tally.non200[status] = tally.non200.get(status, 0) + 1
                tally.note(f"request {i}: HTTP {status} {content[:200]!r}")
                continue
            faulted = fault_kind(i, fault_every, reset_every) is not None
            expected_model = "teacher" if faulted else "student-small"
            try:
                text = orjson.loads(content)["choices"][0]["message"]["content"]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                text = None
            if text != f"{expected_model} r{i} n{i}" or headers.get("x-request-id") != f"r{i}":
                if isinstance(text, str) and text.endswith(f" r{i} n{i}"):
                    tally.wrong_model += 1
                else:
                    tally.mismatched += 1
                tally.note(f"request {i}: got {text!r}, x-request-id {headers.get('x-request-id')!r}")
                continue
            tally.ok[i] = tally.ok.get(i, 0) + 1
    finally:
        if writer is not None:
            writer.close()


# --------------------------------------------------------------------------- report


@dataclass
class LoadReport:
    """The numbers of one run and the invariants they must satisfy."""

    requests: int
    concurrency: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    injected_status: int
    injected_reset: int
    expected_faults: int
    fallbacks: float
    upstream_errors: float
    ok: int
    lost: int
    duplicated: int
    mismatched: int
    wrong_model: int
    non200: dict[int, int]
    gateway_cpu_s: float
    bench_cpu_s: float
    upstream_unmarked: int
    student_seen: int
    student_repeats: int
    teacher_seen: int
    teacher_unexpected: int
    examples: list[str]
    store: StoreCount | None = None

    @property
    def injected(self) -> int:
        """Faults the student actually injected."""
        return self.injected_status + self.injected_reset

    @property
    def rps(self) -> float:
        """Requests per second over the whole run."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    def failures(self) -> list[str]:
        """Every broken invariant, in words; empty when the run is clean."""
        checks = [
            (self.ok == self.requests, f"{self.requests - self.ok} request(s) without a matching 200"),
            (self.lost == 0, f"{self.lost} request(s) lost"),
            (self.duplicated == 0, f"{self.duplicated} request(s) answered more than once"),
            (self.mismatched == 0, f"{self.mismatched} response(s) carried another request's marker"),
            (self.wrong_model == 0, f"{self.wrong_model} response(s) from the wrong model"),
            (not self.non200, f"non-200 responses: {self.non200}"),
            (
                self.injected == self.expected_faults,
                f"student injected {self.injected} faults, expected {self.expected_faults}",
            ),
            (
                self.fallbacks == self.injected,
                f"fallbacks counted {self.fallbacks:g} != faults injected {self.injected}",
            ),
            (
                self.upstream_errors == self.injected,
                f"upstream errors counted {self.upstream_errors:g} != faults injected {self.injected}",
            ),
            (
                self.upstream_unmarked == 0,
                f"{self.upstream_unmarked} upstream request(s) lost their x-request-id or nonce",
            ),
            (
                self.student_seen == self.requests and self.student_repeats == 0,
                f"student saw {self.student_seen} distinct requests ({self.student_repeats} repeats), "
                f"expected {self.requests}",
            ),
            (
                self.teacher_seen == self.injected and self.teacher_unexpected == 0,
                f"teacher saw {self.teacher_seen} requests ({self.teacher_unexpected} not faulted), "
                f"expected the {self.injected} faulted ones",
            ),
        ]
        if self.store is not None:
            st = self.store
            checks += [
                (
                    st.requests == self.requests and st.rows == self.requests,
                    f"store holds {st.rows} rows for {st.requests} of {self.requests} requests",
                ),
                (
                    st.fallbacks == self.injected,
                    f"store has {st.fallbacks} fallback rows != faults injected {self.injected}",
                ),
            ]
        return [msg for ok, msg in checks if not ok]

    def lines(self) -> list[str]:
        """The report, one `name value` per line."""
        return [
            f"requests            {self.requests}",
            f"concurrency         {self.concurrency}",
            f"duration_s          {self.duration_s:.2f}",
            f"req_per_s           {self.rps:.0f}",
            f"latency_p50_ms      {self.p50_ms:.2f}",
            f"latency_p99_ms      {self.p99_ms:.2f}",
            f"cpu_s               gateway {self.gateway_cpu_s:.1f}, bench client+fakes "
            f"{self.bench_cpu_s:.1f} (of {self.duration_s:.1f} s wall)",
            f"injected_faults     {self.injected} (http500 {self.injected_status}, "
            f"reset {self.injected_reset}; expected {self.expected_faults})",
            f"fallbacks_counted   {self.fallbacks:g}",
            f"upstream_errors     {self.upstream_errors:g}",
            f"answered_ok         {self.ok}",
            f"lost                {self.lost}",
            f"duplicated          {self.duplicated}",
            f"mismatched          {self.mismatched + self.wrong_model}",
            f"non_200             {sum(self.non200.values())} {self.non200 or ''}".rstrip(),
            *(
                []
                if self.store is None
                else [
                    f"store_rows          {self.store.rows} for {self.store.requests} distinct requests "
                    f"({self.store.fallbacks} with fallback upstream_error)"
                ]
            ),
        ]


@dataclass
class StoreCount:
    """What the traffic store holds after a run: rows, distinct requests of the run, fallbacks."""

    rows: int
    requests: int
    fallbacks: int


def count_store(data_dir: Path, requests: int) -> StoreCount:
    """Read a SQLite traffic store back and count it against requests r0..r<requests-1>."""
    from router.config import StoreConfig
    from router.store import read_traffic

    rows = fallbacks = 0
    expected = {f"r{i}" for i in range(requests)}
    seen: set[str] = set()
    for row in read_traffic(StoreConfig(data_dir=data_dir)):
        rows += 1
        if row.request_id in expected:
            seen.add(row.request_id)
        fallbacks += row.fallback == "upstream_error"
    return StoreCount(rows, len(seen), fallbacks)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics; samples keyed by (name, sorted labels)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET /metrics HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/metrics answered {head[:100]!r}")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample_sum(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class Driver:
    """The fake upstreams and client of a run, against a gateway started separately."""

    def __init__(self, fault_every: int, reset_every: int) -> None:
        self.student = FakeModel("student-small", fault_every, reset_every)
        self.teacher = FakeModel("teacher")
        self.servers: list[asyncio.Server] = []
        self.urls: dict[str, str] = {}

    async def start(self) -> None:
        """Open the two fake upstreams."""
        for model in (self.student, self.teacher):
            server, url = await _serve_fake(model)
            self.servers.append(server)
            self.urls[model.name] = url

    async def aclose(self) -> None:
        """Close the fakes (dropping any connection the gateway still holds)."""
        for server in self.servers:
            server.close()
            if hasattr(server, "close_clients"):
                server.close_clients()
            await server.wait_closed()

    async def drive(
        self,
        url: str,
        first: int,
        count: int,
        concurrency: int,
        timeout_s: float = 60.0,
        tally: Tally | None = None,
    ) -> tuple[Tally, float]:
        """Send requests `first`..`first+count-1` with `concurrency` connections; (tally, seconds)."""
        host, port = url.removeprefix("http://").split(":")
        indices = iter(range(first, first + count))

        def next_index() -> int | None:
            return next(indices, None)

        tally = tally if tally is not None else Tally()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _worker(
                    host,
                    int(port),
                    next_index,
                    tally,
                    self.student.fault_every,
                    self.student.reset_every,
                    timeout_s,
                )
                for _ in range(concurrency)
            )
        )
        return tally, time.perf_counter() - started

    def report(
        self,
        url: str,
        tally: Tally,
        duration_s: float,
        requests: int,
        concurrency: int,
        cpu: tuple[float, float] = (0.0, 0.0),
        first: int = 0,
    ) -> LoadReport:
        """Combine the client's tally, the fakes' counts and the gateway's /metrics."""
        samples = scrape(url)
        expected = sum(
            fault_kind(i, self.student.fault_every, self.student.reset_every) is not None
            for i in range(first, first + requests)
        )
        lat = sorted(tally.latencies)
        teacher_unexpected = sum(
            1
            for i in self.teacher.seen
            if fault_kind(i, self.student.fault_every, self.student.reset_every) is None
        )
        return LoadReport(
            requests=requests,
            concurrency=concurrency,
            duration_s=duration_s,
            p50_ms=_percentile(lat, 0.50) * 1000,
            p99_ms=_percentile(lat, 0.99) * 1000,
            gateway_cpu_s=cpu[0],
            bench_cpu_s=cpu[1],
            injected_status=self.student.injected["status"],
            injected_reset=self.student.injected["reset"],
            expected_faults=expected,
            fallbacks=sample_sum(
                samples, "triage_fallbacks_total", model="student-small", reason="upstream_error"
            ),
            upstream_errors=sample_sum(samples, "triage_upstream_errors_total", model="student-small"),
            ok=len(tally.ok),
            lost=tally.lost,
            duplicated=sum(n - 1 for n in tally.ok.values() if n > 1),
            mismatched=tally.mismatched,
            wrong_model=tally.wrong_model,
            non200=tally.non200,
            upstream_unmarked=self.student.bad_requests + self.teacher.bad_requests,
            student_seen=len(self.student.seen),
            student_repeats=sum(n - 1 for n in self.student.seen.values()),
            teacher_seen=sum(self.teacher.seen.values()),
            teacher_unexpected=teacher_unexpected,
            examples=tally.examples,
        )


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the client must not be the bottleneck), else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_load(
    requests: int,
    concurrency: int = 96,
    fault_every: int = 10,
    reset_every: int = 4,
    log: Path | None = None,
    deadline_s: float | None = None,
    store_dir: Path | None = None,
) -> LoadReport:
    """Start fakes and `triage serve`, send `requests`, and report (the gateway is always stopped).

    `deadline_s` bounds the whole client phase (TimeoutError past it). With `store_dir`, the
    gateway keeps a SQLite traffic store there, counted once the gateway has stopped.
    """
    loop = new_loop()
    driver = Driver(fault_every, reset_every)
    try:
        loop.run_until_complete(driver.start())
        config = gateway_config(driver.urls["student-small"], driver.urls["teacher"], free_port())
        if store_dir is not None:
            config["store"] = {"kind": "sqlite", "data_dir": str(store_dir)}
        with triage_serve(config, log) as (url, pid):
            cpu0 = process_cpu_s(pid), time.process_time()
            tally, duration = loop.run_until_complete(
                asyncio.wait_for(driver.drive(url, 0, requests, concurrency), deadline_s)
            )
            cpu = process_cpu_s(pid) - cpu0[0], time.process_time() - cpu0[1]
            report = driver.report(url, tally, duration, requests, concurrency, cpu)
        # The gateway has stopped: a clean shutdown has written every record.
        if store_dir is not None:
            report.store = count_store(store_dir, requests)
        return report
    finally:
        loop.run_until_complete(driver.aclose())
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Run the load test and print its numbers; exit 1 when an invariant fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=96)
    parser.add_argument(
        "--fault-every", type=int, default=10, help="one request in N gets a fault (0 = none)"
    )
    parser.add_argument(
        "--reset-every",
        type=int,
        default=4,
        help="one fault in N is a TCP reset instead of HTTP 500 (0 = none)",
    )
    parser.add_argument("--gateway-log", type=Path, help="keep the gateway's output here")
    parser.add_argument(
        "--store-dir", type=Path, help="run with a SQLite traffic store in this (empty) folder and count it"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 1024:
        parser.error("--requests must be 1..1,000,000 and --concurrency 1..1024")
    report = run_load(
        args.requests,
        args.concurrency,
        args.fault_every,
        args.reset_every,
        args.gateway_log,
        store_dir=args.store_dir,
    )
    print("\n".join(report.lines()))
    failures = report.failures()
    for line in failures:
        print(f"FAIL: {line}")
    for line in report.examples:
        print(f"  e.g. {line}")
    print("RESULT: " + ("FAIL" if failures else "PASS"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
