"""Graceful shutdown on SIGTERM and config reload without dropping a request."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest
import yaml

from tests.conftest import GatewayFactory, Upstreams, base_config
from tests.loopback import triage_process


@pytest.fixture
def serve_process(
    upstreams: Upstreams, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    cfg = tmp_path / "config.yaml"
    raw = base_config(upstreams.urls)
    raw["admin"] = {"reload_endpoint": True}
    cfg.write_text(yaml.safe_dump(raw))
    with triage_process(cfg, "--drain-timeout-s", "10") as served:
        yield served.proc, served.url, cfg


def read_stream(url: str, out: dict[str, Any]) -> None:
    payload = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        out["events"] = events
    except httpx.HTTPError as exc:  # pragma: no cover - reported by the assertion
        out["error"] = repr(exc)


def test_sigterm_drains_in_flight_streams(
    serve_process: tuple[subprocess.Popen[bytes], str, Path], upstreams: Upstreams
) -> None:
    proc, url, _ = serve_process
    upstreams.small.chunks = 15
    upstreams.small.chunk_delay_s = 0.1  # a 1.5 s answer
    out: dict[str, Any] = {}
    reader = threading.Thread(target=read_stream, args=(url, out))
    reader.start()
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(url + "/healthz", timeout=1)
    reader.join(10)
    assert "error" not in out
    events = out["events"]
    assert events[-1] == "[DONE]"
    text = "".join(
        orjson.loads(e)["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if orjson.loads(e)["choices"]
    )
    assert text == "".join(f"small-{i} " for i in range(15))
    assert proc.wait(10) in (0, -signal.SIGTERM)


def test_reload_swaps_policy_and_rejects_bad_config(
    serve_process: tuple[subprocess.Popen[bytes], str, Path], upstreams: Upstreams
) -> None:
    proc, url, cfg = serve_process
    raw = yaml.safe_load(cfg.read_text())
    ask = {"model": "auto", "messages": [{"role": "user", "content": "thanks"}]}
    assert httpx.post(url + "/v1/chat/completions", json=ask).headers["x-triage-model"] == "student-small"

    # Requests keep flowing while the config is swapped underneath them.
    upstreams.small.delay_s = 0.05
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=url) as client:
            while not stop.is_set():
                results.append(client.post("/v1/chat/completions", json=ask).status_code)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    raw["models"][0]["max_score"] = 0.01  # nothing is easy enough for the small student now
    cfg.write_text(yaml.safe_dump(raw))
    resp = httpx.post(url + "/admin/reload")
    assert resp.status_code == 200, resp.text
    time.sleep(0.3)
    # SIGHUP reloads too (no change this time).
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert results and all(code == 200 for code in results)
    assert httpx.post(url + "/v1/chat/completions", json=ask).headers["x-triage-model"] == "student-large"

    cfg.write_text("models: [this is not a valid config")
    bad = httpx.post(url + "/admin/reload")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_config"
    # The old config keeps serving.
    assert httpx.post(url + "/v1/chat/completions", json=ask).headers["x-triage-model"] == "student-large"
    metrics = httpx.get(url + "/metrics").text
    assert 'triage_config_reloads_total{result="applied"} 2.0' in metrics
    assert 'triage_config_reloads_total{result="rejected"} 1.0' in metrics


def test_reload_endpoint_off_by_default(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        assert httpx.post(gw.url + "/admin/reload").status_code == 404


def test_stream_in_flight_survives_reload(
    serve_process: tuple[subprocess.Popen[bytes], str, Path], upstreams: Upstreams
) -> None:
    _, url, _ = serve_process
    upstreams.small.chunks = 15
    upstreams.small.chunk_delay_s = 0.1  # a 1.5 s answer
    out: dict[str, Any] = {}
    reader = threading.Thread(target=read_stream, args=(url, out))
    reader.start()
    time.sleep(0.4)
    assert httpx.post(url + "/admin/reload").status_code == 200  # the old gateway retires
    reader.join(10)
    assert "error" not in out
    assert out["events"][-1] == "[DONE]"
    assert len(out["events"]) == 15 + 2  # every content chunk, the finish chunk, [DONE]
