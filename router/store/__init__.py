"""The traffic store: one row per request, and one per shadow comparison, in SQLite or PostgreSQL.

Writing (the gateway): `open_store(config, metrics)` returns a started `TrafficStore`,
a `router.records.RecordSink` that the app appends to `recorder.sinks`; it batches
records off the request path and `close()` writes what is left at shutdown. Without
`store:` in the config, `open_store` returns None and nothing is stored.

Reading (`triage learn`, `triage export`, `triage replay`, anything offline):

    from router.store import read_traffic
    for req in read_traffic(config.store, since=None, until=None):   # unix seconds
        req.request_id, req.model, req.reason, req.score, req.quality, req.fallback ...
        req.prompt, req.messages, req.answer      # captured text (redacted), else None
        for sh in req.shadows:                    # ShadowRecord: student, agreement,
            sh.agreement, sh.teacher_answer       # teacher_answer (captured only), tokens

`read_traffic(store_config, since, until) -> Iterator[StoredRequest]` yields requests
oldest first, paged on its own connection (safe while gateways write; a SQLite store
with no file yet yields nothing). A `StoredRequest` is a `router.records.RequestRecord`
(the same fields, `attempted` as a tuple, `messages` as parsed JSON) plus `shadows`:
the `ShadowRecord`s its gateway process wrote under the same request id. The text of
an old capture may have been cleared by `capture.retention_days` or `capture.max_mb`:
`captured` stays True, `prompt`/`messages`/`answer` become None.

The tables (`router.store.schema`): `triage_requests` and `triage_shadows`, keyed by
(writer, seq), the writing process's id and sequence number.
"""

from __future__ import annotations

from router.config import Config
from router.metrics import Metrics
from router.store.database import Database, sqlite_path
from router.store.reader import read_traffic
from router.store.schema import StoredRequest
from router.store.writer import TrafficStore

__all__ = ["Database", "StoredRequest", "TrafficStore", "open_store", "read_traffic", "sqlite_path"]


def open_store(config: Config, metrics: Metrics | None = None) -> TrafficStore | None:
    """The running store for this config (its writer thread started), or None without `store:`."""
    if config.store is None:
        return None
    return TrafficStore(config.store, config.capture, metrics).start()
