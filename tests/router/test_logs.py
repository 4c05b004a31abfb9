"""The log lines of a real `triage serve`: start-up, one per request, fallbacks, breakers, reloads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from tests.conftest import Upstreams, base_config
from tests.loopback import closed_port_url, triage_process

EASY = {"role": "user", "content": "hi"}


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines() if line.startswith("{")]

    def wait_for(self, text: str, timeout_s: float = 5.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines() if text in line]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r} in:\n" + self.log.read_text())


@contextmanager
def serve_logged(config: Path, *args: str) -> Iterator[Served]:
    log = config.parent / "triage.log"
    with triage_process(config, "--log-level", "info", *args, log=log) as served:
        yield Served(served.url, served.proc, log)


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plain_log_lines(tmp_path: Path, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_TEST_KEYS", "app:k-app")
    raw = base_config(upstreams.urls, breaker_failures=1, endpoint_cooldown_s=30)
    raw["auth"] = {"keys_env": "TRIAGE_TEST_KEYS"}
    raw["admin"] = {"reload_endpoint": True}
    config = _write(tmp_path, raw)
    auth = {"authorization": "Bearer k-app"}
    with serve_logged(config) as served:
        start = served.wait_for("gateway started")
        assert "teacher=teacher" in start and "students=student-small<0.3,student-large<0.5" in start
        assert "classifier=heuristic" in start and "auth=keys" in start

        resp = httpx.post(
            served.url + "/v1/chat/completions",
            headers={**auth, "x-request-id": "req-1"},
            json={"model": "auto", "messages": [EASY]},
        )
        assert resp.status_code == 200
        line = served.wait_for("request_id=req-1")
        for part in (
            "triage.access",
            "key=app",
            "endpoint=chat",
            "requested=auto",
            "model=student-small",
            "reason=classifier",
            "score=",
            "status=200",
            "latency_ms=",
            "fallback=-",
        ):
            assert part in line, line
        assert "k-app" not in served.log.read_text()  # the key itself never appears

        # A rejected request has its own line.
        assert httpx.post(served.url + "/v1/chat/completions", json={"model": "auto"}).status_code == 401
        assert "status=401" in served.wait_for("rejected")

        # A student outage: the failure, the breaker opening and the fallback are logged.
        upstreams.small.mode = "status"
        upstreams.small.status = 503
        resp = httpx.post(
            served.url + "/v1/chat/completions",
            headers={**auth, "x-request-id": "req-2"},
            json={"model": "auto", "messages": [EASY]},
        )
        assert resp.headers["x-triage-model"] == "teacher"
        assert "model=student-small" in served.wait_for("upstream failed")
        assert "state=open" in served.wait_for("circuit breaker")
        fallback = served.wait_for(" fallback ")
        assert "to=teacher" in fallback and "reason=upstream_error" in fallback
        line = served.wait_for("request_id=req-2")
        assert "model=teacher" in line and "reason=fallback" in line and "fallback=upstream_error" in line

        # A reload by signal is logged, and a broken file is logged as rejected, not as a
        # task exception nobody retrieved.
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for("config reloaded")
        config.write_text("models: [")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for("config reload rejected")
    text = served.log.read_text()
    assert "Task exception was never retrieved" not in text
    assert "Traceback" not in text


def test_json_log_lines(tmp_path: Path, upstreams: Upstreams) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["endpoints"] = [closed_port_url() + "/v1"]
    config = _write(tmp_path, raw)
    with serve_logged(config, "--log-format", "json") as served:
        served.wait_for("gateway started")
        resp = httpx.post(
            served.url + "/v1/chat/completions",
            headers={"x-request-id": "req-j"},
            json={"model": "auto", "messages": [EASY]},
        )
        assert resp.headers["x-triage-model"] == "teacher"
        served.wait_for('"request_id":"req-j"')
        records = served.json_lines()
    access = [r for r in records if r.get("request_id") == "req-j" and r["logger"] == "triage.access"]
    assert len(access) == 1
    record = access[0]
    assert record["model"] == "teacher" and record["reason"] == "fallback"
    assert record["fallback"] == "upstream_error" and record["status"] == 200
    assert record["attempted"] == "student-small,teacher"
    assert isinstance(record["latency_ms"], float) and isinstance(record["score"], float)
    assert any(r["msg"] == "fallback" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_check_config_and_route_warn_on_unset_secrets(tmp_path: Path, upstreams: Upstreams) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][2]["api_key_env"] = "TRIAGE_TEST_UNSET_TEACHER_KEY"
    config = _write(tmp_path, raw)
    env = {"PATH": "/usr/bin:/bin"}
    check = subprocess.run(
        [sys.executable, "-m", "router", "check-config", str(config)], capture_output=True, text=True, env=env
    )
    assert check.returncode == 0, check.stderr
    assert "TRIAGE_TEST_UNSET_TEACHER_KEY is not set" in check.stderr and "warning" in check.stderr
    route = subprocess.run(
        [sys.executable, "-m", "router", "route", "hello", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert route.returncode == 0, route.stderr
    assert "student-small" in route.stdout
    # `serve` does need it, and says so.
    serve = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert serve.returncode == 2 and "TRIAGE_TEST_UNSET_TEACHER_KEY" in serve.stderr
