"""The traffic store on SQLite: what a gateway writes, what readers get back, capture and limits."""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from router.config import CaptureConfig, StoreConfig
from router.records import RequestRecord, ShadowRecord
from router.store import Database, TrafficStore, read_traffic, sqlite_path
from router.store.schema import REQUEST_COLUMNS, SHADOW_COLUMNS
from tests.conftest import GatewayFactory, Upstreams, base_config
from tests.loopback import triage_process
from tests.router.stored_traffic import serve_and_store


def record(i: int, ts: float | None = None, **fields: Any) -> RequestRecord:
    """A served request's record, numbered `i`."""
    values: dict[str, Any] = {
        "ts": time.time() if ts is None else ts,
        "request_id": f"r{i}",
        "key": "team-a",
        "api": "chat",
        "requested": "auto",
        "model": "student-small",
        "attempted": ("student-small",),
        "reason": "classifier",
        "score": 0.25,
        "threshold_factor": 1.0,
        "status": 200,
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.001,
        "teacher_cost_usd": 0.01,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "upstream_ms": 11.0,
        "fallback": None,
        "error": None,
        "quality": "passed",
        "shadowed": False,
    }
    values.update(fields)
    return RequestRecord(**values)


def store_config(tmp_path: Path, **fields: Any) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", flush_interval_s=0.05, **fields)


def test_every_record_field_has_a_column() -> None:
    assert [c for c, _ in REQUEST_COLUMNS] == list(RequestRecord.__dataclass_fields__)
    assert [c for c, _ in SHADOW_COLUMNS] == list(ShadowRecord.__dataclass_fields__)


def test_gateway_requests_come_back_with_their_shadows(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    answered: dict[str, tuple[str, float, int]] = {}  # request id -> model, score, prompt tokens

    def send(client: openai.OpenAI) -> None:
        for i in range(5):
            raw = client.chat.completions.with_raw_response.create(
                model="auto",
                messages=[{"role": "user", "content": f"thanks, write to me at ann{i}@example.com"}],
                extra_headers={"x-request-id": f"req-{i}"},
            )
            usage = raw.parse().usage
            assert usage is not None
            answered[f"req-{i}"] = (
                raw.headers["x-triage-model"],
                float(raw.headers["x-triage-score"]),
                usage.prompt_tokens,
            )

    config, _ = serve_and_store(upstreams, make_gateway, tmp_path, send, shadows=5)
    # The gateway has stopped: a clean shutdown wrote everything.
    rows = list(read_traffic(StoreConfig.model_validate(config["store"])))
    assert [r.request_id for r in rows] == [f"req-{i}" for i in range(5)]
    for row in rows:
        model, score, prompt_tokens = answered[row.request_id]
        assert row.score is not None and abs(row.score - score) < 1e-3
        assert (row.model, row.reason, row.prompt_tokens) == (model, "classifier", prompt_tokens)
        assert row.attempted == ("student-small",) and row.shadowed and row.captured
        assert row.cost_usd == pytest.approx((row.prompt_tokens * 0.1 + row.completion_tokens * 0.2) / 1e6)
        assert row.prompt is not None and "@" not in row.prompt and "[EMAIL]" in row.prompt
        assert row.messages is not None and "[EMAIL]" in row.messages[-1]["content"]
        assert row.answer == "the student says this"
        (shadow,) = row.shadows
        assert shadow.student == "student-small" and 0 <= shadow.agreement < 1
        assert shadow.teacher_answer == "the teacher says that"


def test_no_store_section_stores_nothing(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        assert gw.app.state.recorder.sinks == []


def test_capture_is_off_unless_enabled_and_sampled_at_its_rate(tmp_path: Path) -> None:
    off = TrafficStore(store_config(tmp_path), CaptureConfig(sample_rate=1.0))
    assert not any(off.sample_capture() for _ in range(1000))
    random.seed(7)
    sampled = TrafficStore(store_config(tmp_path), CaptureConfig(enabled=True, sample_rate=0.3))
    share = sum(sampled.sample_capture() for _ in range(2000)) / 2000
    assert 0.25 < share < 0.35
    every = TrafficStore(store_config(tmp_path), CaptureConfig(enabled=True))
    assert all(every.sample_capture() for _ in range(1000))


def test_redaction_of_emails_keys_and_own_patterns(tmp_path: Path) -> None:
    capture = CaptureConfig(enabled=True, redact_patterns=[r"\bACCT-\d{6}\b"])
    store = TrafficStore(store_config(tmp_path), capture).start()
    text = (
        "mail jo.doe+x@mail.example.org, key sk-proj-AbCdEfGhIjKlMnOpQrStUv, aws AKIAABCDEFGHIJKLMNOP, "
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz123, account ACCT-123456, order 123456"
    )
    store.request(
        record(
            1,
            captured=True,
            prompt=text,
            messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
            answer="reply to x@y.io",
        )
    )
    store.shadow(ShadowRecord(time.time(), "r1", "student-small", 0.5, "ask ops@corp.example.com", 1, 2))
    store.close()
    (row,) = read_traffic(store.config)
    expected = (
        "mail [EMAIL], key [KEY], aws [KEY], Authorization: Bearer [KEY], account [REDACTED], order 123456"
    )
    assert row.prompt == expected
    assert row.messages == [{"role": "user", "content": [{"type": "text", "text": expected}]}]
    assert row.answer == "reply to [EMAIL]"
    assert row.shadows[0].teacher_answer == "ask [EMAIL]"


def test_retention_and_capture_limits(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    store = TrafficStore(config, CaptureConfig(enabled=True)).start()
    now = time.time()
    day = 86400.0
    ages = {"old": 10 * day, "month": 3 * day, "fresh": 60.0}
    for i, (name, age) in enumerate(ages.items()):
        store.request(record(i, ts=now - age, request_id=name, captured=True, prompt="x" * 1000, answer="y"))
    store.close()
    db = Database.connect(config)
    assert db is not None
    try:
        # Captured text older than two days goes; the rows stay.
        assert db.prune(now, None, 2.0, None).cleared == 2
        rows = {r.request_id: r for r in read_traffic(config)}
        assert [rows[n].prompt is None for n in ages] == [True, True, False]
        assert all(r.captured for r in rows.values())
        # Rows older than a week go.
        assert db.prune(now, 7.0, None, None).deleted == 1
        assert sorted(r.request_id for r in read_traffic(config)) == ["fresh", "month"]
    finally:
        db.close()


def test_size_cap_keeps_the_newest_text(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    store = TrafficStore(config, CaptureConfig(enabled=True)).start()
    now = time.time()
    for i in range(10):  # 1000 bytes each, newest last
        store.request(record(i, ts=now - 100 + i, captured=True, prompt="p" * 999, answer="a"))
    store.close()
    db = Database.connect(config)
    assert db is not None
    try:
        assert db.prune(now, None, None, 3500).cleared == 7
    finally:
        db.close()
    kept = [r.request_id for r in read_traffic(config) if r.prompt is not None]
    assert kept == ["r7", "r8", "r9"]


def test_a_dead_store_drops_and_counts_without_failing_requests(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the data folder should be")
    raw = base_config(upstreams.urls)
    raw["store"] = {"data_dir": str(blocked), "max_queue": 10, "close_timeout_s": 0.2}
    with make_gateway(raw) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        for _ in range(30):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "thanks"}])
        assert gw.metric("triage_store_dropped_records_total", {"reason": "queue_full"}) == 20
    assert gw.metric("triage_store_dropped_records_total", {"reason": "shutdown"}) == 10
    assert gw.metric("triage_store_write_errors_total") >= 1
    assert gw.metric("triage_store_written_records_total") == 0


def test_records_written_by_several_processes_share_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = store_config(tmp_path)
    stores = [TrafficStore(config, CaptureConfig()).start() for _ in range(3)]
    for n, store in enumerate(stores):
        for i in range(200):
            store.request(record(n * 1000 + i))
    for store in stores:
        store.close()
    with sqlite3.connect(sqlite_path(config)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        writers = conn.execute("SELECT COUNT(DISTINCT writer), COUNT(*) FROM triage_requests").fetchone()
    assert writers == (3, 600)
    monkeypatch.setattr("router.store.reader.PAGE", 7)  # many pages, ties in ts across writers
    ids = [r.request_id for r in read_traffic(config)]
    assert len(ids) == len(set(ids)) == 600


def test_a_reader_of_a_missing_store_gets_nothing(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    assert list(read_traffic(config)) == []
    assert not sqlite_path(config).exists()


@pytest.mark.parametrize("since, until, expected", [(None, None, 5), (2.0, None, 3), (1.0, 3.0, 2)])
def test_reading_a_time_range(
    tmp_path: Path, since: float | None, until: float | None, expected: int
) -> None:
    config = store_config(tmp_path)
    store = TrafficStore(config, CaptureConfig()).start()
    for i in range(5):
        store.request(record(i, ts=float(i)))
    store.close()
    got = [r.ts for r in read_traffic(config, since, until)]
    assert got == sorted(got) and len(got) == expected


def _served_rows(raw: dict[str, Any], tmp_path: Path, *args: str, reload_after: int | None = None) -> int:
    """Serve `raw` with `triage serve *args`, send 200 requests over 8 connections (reloading the
    config after `reload_after`), stop it cleanly; the number of requests sent."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with triage_process(cfg, *args) as served:
        clients = [httpx.Client(base_url=served.url) for _ in range(8)]

        def one(i: int) -> None:
            resp = clients[i % 8].post(
                "/v1/chat/completions",
                json={"model": "auto", "messages": [{"role": "user", "content": "thanks"}]},
                headers={"x-request-id": f"q{i}"},
            )
            assert resp.status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(100)))
            if reload_after is not None:
                assert clients[0].post("/admin/reload").status_code == 200
            list(pool.map(one, range(100, 200)))
        for client in clients:
            client.close()
        served.proc.terminate()
        assert served.proc.wait(30) in (0, -signal.SIGTERM)
    return 200


def _writers(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(sqlite_path(StoreConfig(data_dir=tmp_path / "data"))) as conn:
        return dict(conn.execute("SELECT writer, COUNT(*) FROM triage_requests GROUP BY writer").fetchall())


def test_each_worker_writes_its_own_batches(upstreams: Upstreams, tmp_path: Path) -> None:
    raw = base_config(upstreams.urls)
    raw["store"] = {"data_dir": "data", "flush_interval_s": 0.05}  # beside the config file
    sent = _served_rows(raw, tmp_path, "--workers", "2")
    ids = [r.request_id for r in read_traffic(StoreConfig(data_dir=tmp_path / "data"))]
    assert sorted(ids) == sorted(f"q{i}" for i in range(sent))
    assert 1 <= len(_writers(tmp_path)) <= 2


def test_a_reload_keeps_the_store(upstreams: Upstreams, tmp_path: Path) -> None:
    raw = base_config(upstreams.urls)
    raw["store"] = {"data_dir": "data", "flush_interval_s": 0.05}
    raw["admin"] = {"reload_endpoint": True}
    sent = _served_rows(raw, tmp_path, reload_after=100)
    assert list(_writers(tmp_path).values()) == [sent]  # one writer, before and after the reload


def test_the_writer_enforces_retention_by_itself(tmp_path: Path) -> None:
    config = store_config(tmp_path, retention_days=1.0, maintenance_interval_s=0.05)
    store = TrafficStore(config, CaptureConfig()).start()
    try:
        store.request(record(0, ts=time.time() - 2 * 86400, request_id="old"))
        store.request(record(1, request_id="new"))
        assert store.flush()
        deadline = time.monotonic() + 10
        while [r.request_id for r in read_traffic(config)] != ["new"]:
            assert time.monotonic() < deadline, "the old row was never deleted"
            time.sleep(0.05)
    finally:
        store.close()
