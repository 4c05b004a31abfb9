"""`triage serve --workers 2`: requests spread over processes, /metrics sums them all."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx2 as httpx
import yaml

from router.app import SAMPLE_EVERY_S
from tests.conftest import Upstreams, base_config
from tests.loopback import triage_process


def test_two_workers_share_metrics(upstreams: Upstreams, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(base_config(upstreams.urls)))
    with triage_process(cfg, "--workers", "2") as served:
        url = served.url
        body = {"model": "auto", "messages": [{"role": "user", "content": "thanks"}]}
        for _ in range(40):
            # A new connection each time, so the kernel spreads them over both workers.
            assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200

        def scrape() -> tuple[str, float]:
            text = httpx.get(url + "/metrics").text
            found = re.search(
                r'^triage_requests_total\{model="student-small",reason="classifier",'
                r'status_class="2xx"\} (\S+)$',
                text,
                re.M,
            )
            assert found, text[:2000]
            return text, float(found.group(1))

        # Each worker adds its counts to the shared files at every scrape it answers and
        # once a second (`Metrics.sample`), so the other worker's last requests may show
        # up to a second later.
        time.sleep(SAMPLE_EVERY_S + 0.5)
        totals = []
        for _ in range(4):  # whichever worker answers the scrape reports the same sum
            text, total = scrape()
            totals.append(total)
        assert totals == [40.0] * 4
        assert len(set(re.findall(r"^triage_build_info\{.*\} (\S+)$", text, re.M))) == 1
