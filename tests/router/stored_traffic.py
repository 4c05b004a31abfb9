"""Traffic through a gateway that stores and captures it, for the commands that read the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import GatewayFactory, Upstreams, base_config


def serve_and_store(
    upstreams: Upstreams,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    send: Callable[[openai.OpenAI], None],
    shadows: int,
) -> tuple[dict[str, Any], Path]:
    """Run `send`'s requests through a gateway with a SQLite store, full capture and every student
    answer shadowed; wait for `shadows` comparisons. Returns the config and its file."""
    upstreams.small.text = "the student says this"
    upstreams.teacher.text = "the teacher says that"
    raw = base_config(upstreams.urls, shadow_rate=1.0)
    raw["store"] = {"data_dir": str(tmp_path / "data"), "flush_interval_s": 0.05}
    raw["capture"] = {"enabled": True}
    with make_gateway(raw) as gw:
        send(openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0))
        compared = {"model": "student-small", "outcome": "compared"}
        deadline = time.monotonic() + 5
        while gw.metric("triage_shadow_requests_total", compared) < shadows:
            assert time.monotonic() < deadline, "shadow comparisons did not finish"
            time.sleep(0.02)
    # The gateway has stopped, so its store has written everything.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def ask(client: openai.OpenAI, text: str, **headers: str) -> None:
    """One chat request routed by the gateway (`model: auto`)."""
    client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": text}], extra_headers=headers or None
    )
