"""The traffic store's writer: records go into a bounded queue and a thread writes them in batches.

The request path only appends to a deque (or, when it is full, counts a drop), so a
slow or dead database never slows or fails a request. The writer thread turns records
into rows (redacting captured text on the way), writes a batch per transaction, and
keeps a batch that failed to retry it once the database answers again; meanwhile new
records wait in the queue up to `store.max_queue`, past which they are dropped and
counted (`triage_store_dropped_records_total`), with a log line at most every
`_LOG_EVERY_S`. Each process (each `--workers` worker, each replica) has its own writer
and its own id in every row it writes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import Any

import orjson

from router.config import CaptureConfig, StoreConfig
from router.logs import event
from router.metrics import Metrics, Tally
from router.records import RequestRecord, ShadowRecord
from router.store.capture import Redactor
from router.store.database import Database
from router.store.schema import request_row, shadow_row

__all__ = ["TrafficStore"]

log = logging.getLogger("triage.store")

# At most one log line this often for failed writes and for drops.
_LOG_EVERY_S = 10.0
# Waits between attempts to reach a database that failed, doubling up to the last.
_RETRY_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class TrafficStore:
    """A `RecordSink` that keeps every record in SQLite or PostgreSQL (see `router.store`)."""

    def __init__(self, store: StoreConfig, capture: CaptureConfig, metrics: Metrics | None = None) -> None:
        self.config = store
        self.capture = capture
        self.writer_id = uuid.uuid4().hex[:16]
        self._rate = capture.sample_rate if capture.enabled else 0.0
        self._redactor = Redactor(capture)
        self._queue: deque[RequestRecord | ShadowRecord] = deque()
        self._max_queue = store.max_queue
        self._batch_size = store.batch_size
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="triage-store", daemon=True)
        self._db: Database | None = None
        self._pending: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] | None = None
        self._seq = 0
        self._failures = 0
        self._retry_at = 0.0
        self._last_error_log = -_LOG_EVERY_S
        self._last_drop_log = -_LOG_EVERY_S
        self._dropped_logged = 0
        self._next_maintenance = 0.0
        # Plain counts (also in metrics, when given). Each is changed by one thread only:
        # the request path queues and drops on a full queue, the writer does the rest.
        self.queued = 0
        self.written = 0
        self.dropped_full = 0
        self.dropped_shutdown = 0
        self.write_errors = 0
        self._metrics = metrics
        self._m_dropped_full: Tally | None = None
        self._m_dropped_shutdown: Tally | None = None
        if metrics is not None:
            self._m_dropped_full = metrics.store_dropped.labels("queue_full")
            self._m_dropped_shutdown = metrics.store_dropped.labels("shutdown")

    # --- the RecordSink side (request path: returns at once, never raises) ---------------

    def sample_capture(self) -> bool:
        """Whether the request starting now has its prompt and answer captured."""
        return self._rate > 0.0 and random.random() < self._rate

    def request(self, record: RequestRecord) -> None:
        """Queue one request's record."""
        self._put(record)

    def shadow(self, record: ShadowRecord) -> None:
        """Queue one shadow comparison's record."""
        self._put(record)

    def _put(self, record: RequestRecord | ShadowRecord) -> None:
        queue = self._queue
        if self._closed or len(queue) >= self._max_queue:
            self.dropped_full += 1
            if self._m_dropped_full is not None:
                self._m_dropped_full.inc()
            return
        queue.append(record)
        self.queued += 1
        if len(queue) == self._batch_size:  # a full batch waits: wake the writer now
            self._wake.set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> TrafficStore:
        """Start the writer thread (it connects, and reconnects, by itself)."""
        self._thread.start()
        return self

    @property
    def dropped(self) -> int:
        """Records dropped: on a full queue, and unwritten at shutdown."""
        return self.dropped_full + self.dropped_shutdown

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record queued so far is written; False if that took over `timeout_s`."""
        target = self.queued
        deadline = time.monotonic() + timeout_s
        while self.written + self.dropped_shutdown < target:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Write what is queued (for up to `store.close_timeout_s`), then stop; blocks.

        Records still unwritten then (the database is down) are dropped and counted.
        """
        if self._closed:
            return
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.config.close_timeout_s + 5.0)
        self._closed = True

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.flush_interval_s
        while not self._stopping.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            self._write_all()
            self._maintain()
            self._log_drops()
        deadline = time.monotonic() + self.config.close_timeout_s
        while (self._queue or self._pending is not None) and time.monotonic() < deadline:
            if not self._write_all():
                time.sleep(min(max(self._retry_at - time.monotonic(), 0.01), 0.25))
        self._closed = True  # anything arriving now is dropped as queue_full
        left = len(self._queue) + (
            0 if self._pending is None else len(self._pending[0]) + len(self._pending[1])
        )
        if left:
            self.dropped_shutdown += left
            if self._m_dropped_shutdown is not None:
                self._m_dropped_shutdown.inc(left)
            event(log, logging.ERROR, "traffic store closed with records unwritten", dropped=left)
        self._log_drops(force=True)
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write_all(self) -> bool:
        """Write batches until the queue is empty (True) or a write fails (False)."""
        while True:
            if self._pending is None:
                if not self._queue:
                    return True
                self._pending = self._take()
            if not self._write(*self._pending):
                return False
            self._pending = None

    def _take(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The next batch off the queue, as rows."""
        requests: list[tuple[Any, ...]] = []
        shadows: list[tuple[Any, ...]] = []
        queue, redact = self._queue, self._redactor
        for _ in range(min(self._batch_size, len(queue))):
            rec = queue.popleft()
            self._seq += 1
            if isinstance(rec, RequestRecord):
                if rec.captured:
                    messages = redact.value(rec.messages) if rec.messages is not None else None
                    requests.append(
                        request_row(
                            self.writer_id,
                            self._seq,
                            rec,
                            redact.text(rec.prompt),
                            None if messages is None else orjson.dumps(messages).decode(),
                            redact.text(rec.answer),
                        )
                    )
                else:
                    requests.append(request_row(self.writer_id, self._seq, rec, None, None, None))
            else:
                shadows.append(shadow_row(self.writer_id, self._seq, rec, redact.text(rec.teacher_answer)))
        return requests, shadows

    def _connected(self) -> Database | None:
        if self._db is None and time.monotonic() >= self._retry_at:
            try:
                self._db = Database.connect(self.config)
            except Exception as exc:  # noqa: BLE001 - any driver error means "not now"
                self._failed("connect", exc)
        return self._db

    def _write(self, requests: list[tuple[Any, ...]], shadows: list[tuple[Any, ...]]) -> bool:
        db = self._connected()
        if db is None:
            return False
        try:
            db.write(requests, shadows)
        except Exception as exc:  # noqa: BLE001
            db.close()
            self._db = None
            self._failed("write", exc)
            return False
        if self._failures:
            event(log, logging.INFO, "traffic store writes resumed", after_failures=self._failures)
            self._failures = 0
        n = len(requests) + len(shadows)
        self.written += n
        if self._metrics is not None:
            self._metrics.store_written.inc(n)
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        self.write_errors += 1
        if self._metrics is not None:
            self._metrics.store_errors.inc()
        self._retry_at = time.monotonic() + _RETRY_S[min(self._failures, len(_RETRY_S) - 1)]
        self._failures += 1
        now = time.monotonic()
        if now - self._last_error_log >= _LOG_EVERY_S:
            self._last_error_log = now
            # The driver's message names the server, never the DSN's password.
            event(
                log,
                logging.WARNING,
                "traffic store unavailable; records wait in memory",
                kind=self.config.kind,
                op=what,
                error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                queued=len(self._queue),
            )

    def _maintain(self) -> None:
        """Retention and the capture limits, every `store.maintenance_interval_s` (traffic or not)."""
        now = time.monotonic()
        if now < self._next_maintenance:
            return
        db = self._connected()
        if db is None:
            return
        self._next_maintenance = now + self.config.maintenance_interval_s
        cap = self.capture.max_mb
        try:
            pruned = db.prune(
                time.time(),
                self.config.retention_days,
                self.capture.retention_days,
                None if cap is None else int(cap * 1024 * 1024),
            )
        except Exception as exc:  # noqa: BLE001
            db.close()
            self._db = None
            self._failed("maintain", exc)
            self._next_maintenance = 0.0  # try again once the database is back
            return
        if pruned.deleted or pruned.cleared:
            event(
                log, logging.INFO, "traffic store pruned", deleted=pruned.deleted, text_cleared=pruned.cleared
            )

    def _log_drops(self, force: bool = False) -> None:
        new = self.dropped - self._dropped_logged
        now = time.monotonic()
        if new and (force or now - self._last_drop_log >= _LOG_EVERY_S):
            self._last_drop_log = now
            self._dropped_logged = self.dropped
            event(
                log,
                logging.WARNING,
                "traffic store dropped records (queue full: the database is slow or down)",
                dropped=new,
                total_dropped=self.dropped,
                max_queue=self._max_queue,
            )
