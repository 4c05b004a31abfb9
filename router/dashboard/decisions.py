"""Where the dashboard's table of recent decisions comes from.

`DecisionSource` is the seam: the app keeps one at `app.state.decisions`. The default reads
the recorder's in-memory ring buffer (the last `Recorder.recent` requests of this process);
a traffic store that keeps every record can put its own source there instead, and the
dashboard pages through it the same way.
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Any, Protocol

from router.metrics import MULTIPROC_ENV
from router.records import Recorder, RequestRecord

__all__ = ["DecisionSource", "RecentDecisions", "row"]


class DecisionSource(Protocol):
    """Recent request records, newest first, a page at a time; answers at once (no I/O wait)."""

    name: str  # shown on the page: where the rows come from

    def page(self, offset: int, limit: int) -> tuple[int, list[RequestRecord]]:
        """(how many records there are, up to `limit` of them starting `offset` from the newest)."""
        ...


class RecentDecisions:
    """The recorder's ring buffer: the last requests this process answered."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        # With workers each process keeps its own buffer: the table is the answering worker's.
        self.name = "memory, this worker" if os.environ.get(MULTIPROC_ENV) else "memory"

    def page(self, offset: int, limit: int) -> tuple[int, list[RequestRecord]]:
        recent = self._recorder.recent
        # Walks only offset + limit entries from the newest end, however full the buffer is.
        return len(recent), list(islice(reversed(recent), offset, offset + limit))


def row(record: RequestRecord) -> dict[str, Any]:
    """The table's columns of one record (never its captured prompt or answer)."""
    return {
        "ts": record.ts,
        "request_id": record.request_id,
        "key": record.key,
        "api": record.api,
        "model": record.model,
        "attempted": list(record.attempted),
        "reason": record.reason,
        "score": record.score,
        "status": record.status,
        "stream": record.stream,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": record.cost_usd,
        "teacher_cost_usd": record.teacher_cost_usd,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "fallback": record.fallback,
        "error": record.error,
    }
