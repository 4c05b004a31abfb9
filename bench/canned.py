"""Shared bench parts: a canned nginx upstream, tool checks, core pinning and /proc accounting.

Imported by `bench/gateway.py` and `bench/aiohttp_vs_httpx.py` (run as scripts,
so this directory is on `sys.path`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from string import Template
from types import TracebackType

import orjson

__all__ = [
    "BENCH_DIR",
    "REPO",
    "CannedUpstream",
    "API_PATHS",
    "api_body",
    "chat_body",
    "cpu_ticks",
    "descendants",
    "busy_processes",
    "ensure_tools",
    "free_port",
    "machine",
    "peak_rss_kib",
    "stop_group",
    "wait_port",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A realistic small request: a system prompt, a short history and a question (~300 bytes).
_SYSTEM = "You are a concise assistant for an online bookshop."
_USER_1 = "Do you ship to Canada?"
_ASSISTANT_1 = "Yes, in 5-8 working days."
_USER_2 = "What does shipping cost for two paperbacks? Is it tracked?"

_ANSWER_WORDS = (
    "Shipping two paperbacks to Canada costs 9.50 USD with standard post. Every parcel gets a "
    "tracking number by email as soon as it leaves the warehouse, and you can follow it on the "
    "carrier site until it reaches you."
).split(" ")


def chat_body(model: str, *, stream: bool = False) -> bytes:
    """The request body every client in the bench sends."""
    payload: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": _USER_1},
            {"role": "assistant", "content": _ASSISTANT_1},
            {"role": "user", "content": _USER_2},
        ],
        "max_tokens": 256,
        "temperature": 0.7,
    }
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


# Where each wire format is served; the same conversation goes to each (see `api_body`).
API_PATHS = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}


def api_body(api: str, model: str, *, stream: bool = False) -> bytes:
    """The bench conversation in one wire format: chat, Responses or Anthropic Messages."""
    if api == "chat":
        return chat_body(model, stream=stream)
    turns = [
        {"role": "user", "content": _USER_1},
        {"role": "assistant", "content": _ASSISTANT_1},
        {"role": "user", "content": _USER_2},
    ]
    payload: dict[str, object]
    if api == "responses":
        payload = {
            "model": model,
            "instructions": _SYSTEM,
            "input": turns,
            "max_output_tokens": 256,
            "temperature": 0.7,
        }
    elif api == "messages":
        payload = {
            "model": model,
            "system": _SYSTEM,
            "messages": turns,
            "max_tokens": 256,
            "temperature": 0.7,
        }
    else:
        raise ValueError(f"unknown api {api!r}")
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def _completion_json() -> bytes:
    text = " ".join(_ANSWER_WORDS)
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0001",
            "object": "chat.completion",
            "created": 1767225600,
            "model": "bench-upstream",
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 78,
                "completion_tokens": len(_ANSWER_WORDS),
                "total_tokens": 78 + len(_ANSWER_WORDS),
            },
        }
    )


def _sse_body() -> bytes:
    """Role chunk, one chunk per word, finish chunk, usage chunk, [DONE]."""
    base = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "bench-upstream",
        "system_fingerprint": "fp_bench",
    }
    chunks: list[dict[str, object]] = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
    ]
    for i, word in enumerate(_ANSWER_WORDS):
        piece = word if i == 0 else " " + word
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                ],
            }
        )
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    chunks.append(
        {
            **base,
            "choices": [],
            "usage": {
                "prompt_tokens": 78,
                "completion_tokens": len(_ANSWER_WORDS),
                "total_tokens": 78 + len(_ANSWER_WORDS),
            },
        }
    )
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    return b"".join(events) + b"data: [DONE]\n\n"


def _nginx_literal(body: bytes) -> str:
    text = body.decode()
    # Inside a single-quoted nginx string these would end the string, start a
    # variable or an escape; the canned bodies are written to avoid them.
    for bad in ("'", "$", "\\"):
        if bad in text:
            raise ValueError(f"canned body contains {bad!r}, which nginx would not pass through")
    return text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Block until something accepts on 127.0.0.1:port; raise if the process died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the process group a child leads, then SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def ensure_tools(tools: dict[str, str]) -> dict[str, str]:
    """Path of each tool (name -> Debian package), installing missing ones with apt-get as root.

    Exits with status 3 and a message when one is missing and cannot be installed.
    """
    found = {name: _which(name) for name in tools}
    missing = sorted({tools[n] for n, p in found.items() if p is None})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing], env=env, check=False, stdout=subprocess.DEVNULL
        )
        found = {name: _which(name) for name in tools}
    still = [n for n, p in found.items() if p is None]
    if still:
        pkgs = " ".join(sorted({tools[n] for n in still}))
        sys.exit(
            f"bench: {', '.join(still)} not found and could not be installed; "
            f"install them first (Debian: apt-get install -y {pkgs})"
        )
    return {n: p for n, p in found.items() if p is not None}


def _which(name: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def machine() -> str:
    """CPU model, logical cores and kernel, for the top of every report."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0))
    return f"{model}; {os.cpu_count()} logical cores ({usable} usable); Linux {os.uname().release}"


def busy_processes(window_s: float = 1.0, threshold: float = 0.1) -> list[str]:
    """Other processes using more than `threshold` of a core over `window_s` (noise check)."""

    def snapshot() -> dict[int, tuple[float, str]]:
        out = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / CLK_TCK, comm)
        return out

    before = snapshot()
    time.sleep(window_s)
    after = snapshot()
    busy = []
    for pid, (cpu, comm) in after.items():
        if pid in before and (cpu - before[pid][0]) / window_s > threshold:
            busy.append(f"{comm}[{pid}] {100 * (cpu - before[pid][0]) / window_s:.0f}%")
    return busy


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def peak_rss_kib(pids: list[int]) -> int:
    """Sum of VmHWM (peak resident set) over these processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


class CannedUpstream:
    """nginx answering every POST with a fixed completion (json_port) or SSE body (sse_port).

    Runs in the foreground (`daemon off; master_process off`), pinned with taskset,
    in its own process group so stopping it cannot miss a child.
    """

    def __init__(self, nginx: str, workdir: Path, cores: str) -> None:
        self.nginx = nginx
        self.workdir = workdir
        self.cores = cores
        self.json_port = free_port()
        self.sse_port = free_port()
        self.completion = _completion_json()
        self.sse = _sse_body()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def json_url(self) -> str:
        """Base URL of the non-streaming upstream."""
        return f"http://127.0.0.1:{self.json_port}"

    @property
    def sse_url(self) -> str:
        """Base URL of the streaming upstream."""
        return f"http://127.0.0.1:{self.sse_port}"

    def __enter__(self) -> CannedUpstream:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = Template((BENCH_DIR / "nginx.conf.tmpl").read_text()).substitute(
            prefix=str(self.workdir),
            json_port=self.json_port,
            sse_port=self.sse_port,
            json_body=_nginx_literal(self.completion),
        )
        (self.workdir / "stream.sse").write_bytes(self.sse)
        conf_path = self.workdir / "nginx.conf"
        conf_path.write_text(conf)
        log = (self.workdir / "nginx.stderr").open("wb")
        self.proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                self.cores,
                self.nginx,
                "-p",
                str(self.workdir),
                "-c",
                str(conf_path),
                "-e",
                str(self.workdir / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        try:
            wait_port(self.json_port, self.proc)
            wait_port(self.sse_port, self.proc)
        except RuntimeError:
            self.__exit__(None, None, None)
            err = (self.workdir / "nginx.stderr").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start:\n{err}") from None
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=2.0)
