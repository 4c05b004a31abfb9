"""A real redis-server per test, on a free loopback port with its own folder, that a test may
kill, freeze and start again on the same port."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.config import StateConfig
from tests.conftest import Upstreams, base_config
from tests.loopback import free_port

REDIS_URL_ENV = "TRIAGE_TEST_REDIS_URL"
KEYS_ENV = "TRIAGE_TEST_KEYS"
BODY = {"model": "student-small", "messages": [{"role": "user", "content": "hi"}]}
# How old a gateway's view of a key's token and budget state may be (the default `state.lease_s`).
LEASE_S: float = StateConfig.model_fields["lease_s"].default
# student-small's price and the fake's usage (11 prompt + 5 completion tokens) per answer.
COST = (11 * 0.1 + 5 * 0.2) / 1e6


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, "alice:sk-alice,bob:sk-bob")


def shared(upstreams: Upstreams, limits: dict[str, Any], **state: Any) -> dict[str, Any]:
    """The fakes' config with keys alice and bob, these limits, and Redis as the shared state."""
    raw = base_config(upstreams.urls)
    raw["auth"] = {"keys_env": KEYS_ENV, "limits": limits}
    raw["state"] = {"redis_url_env": REDIS_URL_ENV, **state}
    return raw


class RedisServer:
    """One redis-server process; `persist` turns on an fsync-always append-only file."""

    def __init__(self, binary: str, folder: Path, persist: bool) -> None:
        self.binary = binary
        self.folder = folder
        self.persist = persist
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again) on the same port and folder; wait until it answers PING."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: " + self._log())
            time.sleep(0.02)

    def _log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> str:
        """One command through redis-cli; its output without the trailing newline."""
        cli = shutil.which("redis-cli")
        assert cli is not None
        out = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    def spent(self, key: str, at_least: float, prefix: str = "triage:") -> float:
        """The key's spend once it reaches `at_least` (charges reach Redis just after answers),
        and LEASE_S later: by then every gateway's next admission sees it."""
        deadline = time.monotonic() + 10
        while True:
            value = float(self.command("GET", f"{prefix}spend:{key}") or 0)
            if value >= at_least * (1 - 1e-9) or time.monotonic() > deadline:
                time.sleep(LEASE_S)
                return value
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop for good (at the end of the test)."""
        if self.proc is not None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _server(tmp_path: Path, persist: bool) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (tests/setup.sh installs the Debian package)")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(binary, folder, persist)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A fresh redis-server (no persistence); its URL is in $TRIAGE_TEST_REDIS_URL."""
    for server in _server(tmp_path, persist=False):
        monkeypatch.setenv(REDIS_URL_ENV, server.url)
        yield server


@pytest.fixture
def persistent_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A redis-server whose data survives a SIGKILL (append-only file, fsync on every write)."""
    for server in _server(tmp_path, persist=True):
        monkeypatch.setenv(REDIS_URL_ENV, server.url)
        yield server
