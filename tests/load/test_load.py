"""Load: 50,000 requests through a real `triage serve` while the student fails 10% of them.

Runs the core of `bench/load.py` (about 60-90 s on a 2-core machine). It asserts
behaviour, not speed: every request gets exactly one 200 carrying its own
marker, the fallback and upstream-error counters equal the injected faults, and
the traffic store (SQLite) holds exactly one row per request.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is a folder of scripts, not a package.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

from load import fault_kind, run_load  # noqa: E402

REQUESTS = 50_000


def test_fault_plan_is_ten_percent_with_some_resets() -> None:
    kinds = [fault_kind(i, 10, 4) for i in range(REQUESTS)]
    assert kinds.count("status") + kinds.count("reset") == REQUESTS // 10
    assert kinds.count("reset") == REQUESTS // 40


@pytest.mark.slow
def test_no_request_lost_and_fallbacks_match_injected_faults(tmp_path: Path) -> None:
    report = run_load(
        REQUESTS, concurrency=96, fault_every=10, reset_every=4, deadline_s=600, store_dir=tmp_path / "store"
    )
    summary = "\n".join([*report.lines(), *report.examples])
    assert report.failures() == [], summary
    assert report.ok == REQUESTS
    assert report.injected_status == 3_750 and report.injected_reset == 1_250
    assert report.fallbacks == report.upstream_errors == 5_000
    assert report.teacher_seen == 5_000
    assert report.store is not None
    assert (report.store.rows, report.store.requests, report.store.fallbacks) == (REQUESTS, REQUESTS, 5_000)
