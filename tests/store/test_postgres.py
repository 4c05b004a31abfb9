"""The traffic store on a real PostgreSQL: replicas writing to one database, the database dying mid-run."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from router.config import CaptureConfig, StoreConfig
from router.records import ShadowRecord
from router.store import Database, TrafficStore, read_traffic
from tests.store.postgres import Postgres
from tests.store.test_sqlite import record

# bench/ is a folder of scripts, not a package.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

from load import (  # noqa: E402
    Driver,
    Tally,
    free_port,
    gateway_config,
    new_loop,
    sample_sum,
    scrape,
    triage_serve,
)


def test_records_and_shadows_round_trip(pg_store: StoreConfig) -> None:
    store = TrafficStore(pg_store, CaptureConfig(enabled=True)).start()
    for i in range(1200):  # more than a batch and a read page
        store.request(record(i, captured=i == 3, prompt="write to a@b.example", messages=[{"x": 1}]))
    store.request(record(1200, score=float("nan")))
    store.shadow(ShadowRecord(time.time(), "r3", "student-small", 0.75, "teacher text", 7, 9))
    store.close()
    assert store.written == 1202 and store.dropped == 0
    rows = list(read_traffic(pg_store))
    assert [r.request_id for r in rows] == [f"r{i}" for i in range(1201)]
    assert rows[-1].score is None and rows[0].score == 0.25  # a NaN score reads back as None
    third = rows[3]
    assert third.captured and third.prompt == "write to [EMAIL]" and third.messages == [{"x": 1}]
    assert third.stream is False and third.attempted == ("student-small",)
    assert [(s.agreement, s.teacher_answer) for s in third.shadows] == [(0.75, "teacher text")]
    assert all(not r.shadows for i, r in enumerate(rows) if i != 3)


def test_retention_and_size_cap_on_postgres(pg_store: StoreConfig) -> None:
    store = TrafficStore(pg_store, CaptureConfig(enabled=True)).start()
    now = time.time()
    for i in range(10):
        store.request(record(i, ts=now - 10 * 86400 + i * 86400, captured=True, prompt="p" * 999, answer="a"))
    store.close()
    db = Database.connect(pg_store)
    assert db is not None
    try:
        pruned = db.prune(now, 8.0, None, 3000)
    finally:
        db.close()
    rows = list(read_traffic(pg_store))
    assert pruned.deleted == 2 and [r.request_id for r in rows] == [f"r{i}" for i in range(2, 10)]
    assert [r.request_id for r in rows if r.prompt is not None] == ["r7", "r8", "r9"]


def _store_config(pg_store: StoreConfig, **fields: Any) -> dict[str, Any]:
    return {"kind": "postgres", "dsn_env": pg_store.dsn_env, "flush_interval_s": 0.05, **fields}


def _check_all_answered(tally: Tally, count: int) -> None:
    assert (len(tally.ok), tally.lost, tally.non200, tally.mismatched) == (count, 0, {}, 0), tally.examples


@pytest.mark.slow
def test_two_gateways_write_to_one_database(pg_store: StoreConfig) -> None:
    per_gateway = 3000
    loop = new_loop()
    driver = Driver(fault_every=0, reset_every=0)
    try:
        loop.run_until_complete(driver.start())
        configs = []
        for _ in range(2):
            config = gateway_config(driver.urls["student-small"], driver.urls["teacher"], free_port())
            config["store"] = _store_config(pg_store)
            configs.append(config)

        async def both(url_a: str, url_b: str) -> tuple[tuple[Tally, float], tuple[Tally, float]]:
            return await asyncio.gather(
                driver.drive(url_a, 0, per_gateway, 24), driver.drive(url_b, per_gateway, per_gateway, 24)
            )

        with triage_serve(configs[0]) as (url_a, _), triage_serve(configs[1]) as (url_b, _):
            (a, _), (b, _) = loop.run_until_complete(both(url_a, url_b))
    finally:
        loop.run_until_complete(driver.aclose())
        loop.close()
    _check_all_answered(a, per_gateway)
    _check_all_answered(b, per_gateway)
    rows = list(read_traffic(pg_store))
    ids = Counter(r.request_id for r in rows)
    assert len(rows) == 2 * per_gateway and set(ids) == {f"r{i}" for i in range(2 * per_gateway)}
    db = Database.connect(pg_store)
    assert db is not None
    try:
        writers = db._fetch("SELECT writer, COUNT(*) FROM triage_requests GROUP BY writer", ())
    finally:
        db.close()
    assert sorted(n for _, n in writers) == [per_gateway, per_gateway]


@pytest.mark.slow
def test_stopping_the_database_mid_run_fails_no_request(postgres: Postgres, pg_store: StoreConfig) -> None:
    phases = (1500, 2500, 1500)  # database up, down, up again
    max_queue = 500
    loop = new_loop()
    driver = Driver(fault_every=0, reset_every=0)
    try:
        loop.run_until_complete(driver.start())
        config = gateway_config(driver.urls["student-small"], driver.urls["teacher"], free_port())
        config["store"] = _store_config(pg_store, max_queue=max_queue, batch_size=100)
        with triage_serve(config) as (url, _):
            first = 0
            for phase, count in enumerate(phases):
                if phase == 1:
                    postgres.stop("immediate")
                elif phase == 2:
                    postgres.start()
                tally, _ = loop.run_until_complete(driver.drive(url, first, count, 24))
                _check_all_answered(tally, count)
                first += count
                if phase == 1:
                    dropped = sample_sum(
                        scrape(url), "triage_store_dropped_records_total", reason="queue_full"
                    )
                    # Everything past the queue's bound (and the one batch held for retry) was dropped.
                    assert dropped >= count - max_queue - 100
            samples = scrape(url)
    finally:
        loop.run_until_complete(driver.aclose())
        loop.close()
    dropped = sample_sum(samples, "triage_store_dropped_records_total", reason="queue_full")
    assert sample_sum(samples, "triage_store_write_errors_total") >= 1
    rows = list(read_traffic(pg_store))
    ids = Counter(r.request_id for r in rows)
    # Nothing written twice (a batch cut off mid-commit is retried whole), nothing lost but the drops.
    assert max(ids.values()) == 1
    assert len(rows) + dropped == sum(phases), (len(rows), dropped)
    assert dropped > 0
