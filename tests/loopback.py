"""Real uvicorn servers on 127.0.0.1 ephemeral ports, run in a thread for tests."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import uvicorn
import yaml
from starlette.types import ASGIApp

from router.app import TriageApp
from router.server import GatewayProtocol


class LoopbackServer(uvicorn.Server):
    """A uvicorn server that can run outside the main thread."""

    def install_signal_handlers(self) -> None:
        # Signal handlers can only be installed in the main thread.
        pass


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # A gateway app runs on the gateway's own protocol, as under `triage serve` (limits from
    # the config defaults); fake upstreams on uvicorn's.
    http: type[asyncio.Protocol] | str = GatewayProtocol if isinstance(app, TriageApp) else "auto"
    server = LoopbackServer(
        uvicorn.Config(app, http=http, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("loopback server failed to start")
        time.sleep(0.001)
    try:
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def triage_process(
    config: Path,
    *args: str,
    start_timeout_s: float = 60,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[ServeProcess]:
    """Run `triage serve` as a real process on a free port; stop it with SIGTERM at the end.

    `args` follow the defaults (`--log-level warning` may be overridden there); `log`
    collects the process's stdout and stderr; `env` and `preexec_fn` go to Popen.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "router", "serve", "--config", str(config), "--port", str(port)]
    cmd += ["--log-level", "warning", *args]
    with ExitStack() as files:
        out = files.enter_context(log.open("wb")) if log is not None else None
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = log.read_text(errors="replace")[-3000:] if log is not None else ""
                raise RuntimeError("triage serve did not start\n" + why)
            time.sleep(0.05)
        yield ServeProcess(proc, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class ServeProcess:
    """A running `triage serve`: the process and its base URL."""

    proc: subprocess.Popen[bytes]
    url: str


@contextmanager
def serving(raw: Mapping[str, object], folder: Path) -> Iterator[str]:
    """`triage serve` on a config dict (written to `folder`); yields its URL, checks a clean stop."""
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump(dict(raw)))
    with triage_process(cfg) as served:
        yield served.url
        served.proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see it.
        assert served.proc.wait(10) in (0, -signal.SIGTERM)
