"""The traffic store's tables, and how a record becomes a row and a row a `StoredRequest`.

One SQL text serves SQLite and PostgreSQL: the column types below are PostgreSQL's,
which SQLite reads as the matching affinities, and both accept `IF NOT EXISTS`,
partial indexes, `ON CONFLICT DO NOTHING` and window functions. Only the
placeholder differs (`?` or `%s`), and is filled in by the backend.

Every row carries the id of the process that wrote it (`writer`) and that process's
sequence number (`seq`): the primary key. A batch whose commit was interrupted is
written again whole, and the rows that did land are skipped, so a retry never
duplicates a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import orjson

from router.records import RequestRecord, ShadowRecord

__all__ = [
    "REQUESTS",
    "REQUEST_COLUMNS",
    "SCHEMA_VERSION",
    "SHADOWS",
    "SHADOW_COLUMNS",
    "StoredRequest",
    "ddl",
    "insert_sql",
    "request_from_row",
    "request_row",
    "row_columns",
    "shadow_from_row",
    "shadow_row",
]

SCHEMA_VERSION = 1
REQUESTS = "triage_requests"
SHADOWS = "triage_shadows"

# (column, SQL type), in the order of RequestRecord's fields; `attempted` is the models
# joined by commas (model names have none), `messages` is JSON.
REQUEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DOUBLE PRECISION NOT NULL"),
    ("request_id", "TEXT NOT NULL"),
    ("key", "TEXT"),
    ("api", "TEXT NOT NULL"),
    ("requested", "TEXT"),
    ("model", "TEXT"),
    ("attempted", "TEXT NOT NULL"),
    ("reason", "TEXT NOT NULL"),
    ("score", "DOUBLE PRECISION"),
    ("threshold_factor", "DOUBLE PRECISION NOT NULL"),
    ("status", "INTEGER NOT NULL"),
    ("stream", "BOOLEAN NOT NULL"),
    ("prompt_tokens", "BIGINT NOT NULL"),
    ("completion_tokens", "BIGINT NOT NULL"),
    ("cost_usd", "DOUBLE PRECISION NOT NULL"),
    ("teacher_cost_usd", "DOUBLE PRECISION NOT NULL"),
    ("latency_ms", "DOUBLE PRECISION NOT NULL"),
    ("ttft_ms", "DOUBLE PRECISION"),
    ("upstream_ms", "DOUBLE PRECISION NOT NULL"),
    ("fallback", "TEXT"),
    ("error", "TEXT"),
    ("quality", "TEXT"),
    ("shadowed", "BOOLEAN NOT NULL"),
    ("captured", "BOOLEAN NOT NULL"),
    ("prompt", "TEXT"),
    ("messages", "TEXT"),
    ("answer", "TEXT"),
    ("family", "TEXT"),
)
SHADOW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DOUBLE PRECISION NOT NULL"),
    ("request_id", "TEXT NOT NULL"),
    ("student", "TEXT NOT NULL"),
    ("agreement", "DOUBLE PRECISION NOT NULL"),
    ("teacher_answer", "TEXT"),
    ("teacher_prompt_tokens", "BIGINT NOT NULL"),
    ("teacher_completion_tokens", "BIGINT NOT NULL"),
)
# Before the record's columns: who wrote the row; after them: bytes of captured text
# (0 when none), which the capture size cap adds up.
_KEY = (("writer", "TEXT NOT NULL"), ("seq", "BIGINT NOT NULL"))
_TEXT_BYTES = (("text_bytes", "INTEGER NOT NULL"),)


def _table(name: str, columns: tuple[tuple[str, str], ...]) -> str:
    cols = ",\n  ".join(f"{c} {t}" for c, t in (*_KEY, *columns, *_TEXT_BYTES))
    return f"CREATE TABLE IF NOT EXISTS {name} (\n  {cols},\n  PRIMARY KEY (writer, seq)\n)"


def ddl() -> list[str]:
    """Statements that create the tables and indexes (each safe to run again)."""
    statements = [
        "CREATE TABLE IF NOT EXISTS triage_store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        _table(REQUESTS, REQUEST_COLUMNS),
        _table(SHADOWS, SHADOW_COLUMNS),
    ]
    for table in (REQUESTS, SHADOWS):
        statements += [
            f"CREATE INDEX IF NOT EXISTS {table}_ts ON {table} (ts)",
            f"CREATE INDEX IF NOT EXISTS {table}_request_id ON {table} (request_id)",
            # The capture limits look only at rows that still hold text.
            f"CREATE INDEX IF NOT EXISTS {table}_text ON {table} (ts) WHERE text_bytes > 0",
        ]
    return statements


def row_columns(columns: tuple[tuple[str, str], ...]) -> list[str]:
    """Every column of a row, in order: the key, the record's `columns`, `text_bytes`."""
    return [c for c, _ in (*_KEY, *columns, *_TEXT_BYTES)]


def insert_sql(table: str, columns: tuple[tuple[str, str], ...], placeholder: str, rows: int = 1) -> str:
    """The insert of `rows` rows into `table`, skipping rows already written (a retried batch)."""
    names = row_columns(columns)
    marks = "(" + ", ".join([placeholder] * len(names)) + ")"
    values = ", ".join([marks] * rows)
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES {values} ON CONFLICT DO NOTHING"


@dataclass(slots=True)
class StoredRequest(RequestRecord):
    """A request read back from the store, with the shadow comparisons made for it."""

    shadows: list[ShadowRecord] = field(default_factory=list)


_REQUEST_NAMES = tuple(c for c, _ in REQUEST_COLUMNS)
_request_values = attrgetter(*_REQUEST_NAMES)
_ATTEMPTED, _PROMPT, _MESSAGES, _ANSWER, _SCORE = (
    _REQUEST_NAMES.index(c) for c in ("attempted", "prompt", "messages", "answer", "score")
)
_shadow_values = attrgetter(*(c for c, _ in SHADOW_COLUMNS))


def request_row(
    writer: str, seq: int, rec: RequestRecord, prompt: str | None, messages: str | None, answer: str | None
) -> tuple[Any, ...]:
    """The row for a request record, with its (already redacted) captured text."""
    values = list(_request_values(rec))
    values[_ATTEMPTED] = ",".join(rec.attempted)
    values[_PROMPT], values[_MESSAGES], values[_ANSWER] = prompt, messages, answer
    score = rec.score
    if score is not None and not math.isfinite(score):
        # SQLite keeps NaN as NULL and PostgreSQL as NaN: both backends read back None.
        values[_SCORE] = None
    size = sum(len(t.encode()) for t in (prompt, messages, answer) if t)
    return (writer, seq, *values, size)


def shadow_row(writer: str, seq: int, rec: ShadowRecord, teacher_answer: str | None) -> tuple[Any, ...]:
    """The row for a shadow comparison, with the teacher's (already redacted) text."""
    values = list(_shadow_values(rec))
    values[4] = teacher_answer
    return (writer, seq, *values, len(teacher_answer.encode()) if teacher_answer else 0)


_BOOLS = {"stream", "shadowed", "captured"}


def request_from_row(row: tuple[Any, ...]) -> StoredRequest:
    """A `StoredRequest` from the request columns (in `REQUEST_COLUMNS` order), without shadows."""
    values = dict(zip(_REQUEST_NAMES, row, strict=True))
    for name in _BOOLS:
        values[name] = bool(values[name])  # SQLite keeps booleans as 0/1
    values["attempted"] = tuple(values["attempted"].split(",")) if values["attempted"] else ()
    if values["messages"] is not None:
        values["messages"] = orjson.loads(values["messages"])
    return StoredRequest(**values)


def shadow_from_row(row: tuple[Any, ...]) -> ShadowRecord:
    """A `ShadowRecord` from the shadow columns (in `SHADOW_COLUMNS` order)."""
    return ShadowRecord(*row)
