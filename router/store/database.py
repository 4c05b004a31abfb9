"""A connection to the traffic store's database, SQLite or PostgreSQL, and the SQL run on it.

Both speak the same statements (`router.store.schema`); a `Dialect` holds the few
differences: the placeholder, how a write transaction starts, and the lock that keeps
replicas starting at once from creating the tables twice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from router.config import StoreConfig
from router.store.schema import (
    REQUEST_COLUMNS,
    REQUESTS,
    SCHEMA_VERSION,
    SHADOW_COLUMNS,
    SHADOWS,
    ddl,
    insert_sql,
    row_columns,
)

__all__ = ["SQLITE_FILE", "Database", "Dialect", "Pruned", "sqlite_path"]

SQLITE_FILE = "traffic.db"
# How long a SQLite writer waits for another process's transaction (workers share the file).
SQLITE_BUSY_TIMEOUT_MS = 10_000
# PostgreSQL: give up on a connection attempt or a statement after this long, so a hung
# server shows up as an error (records then wait in memory) rather than a stuck writer.
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
# Rows per INSERT statement (33 values each: within SQLite's 32,766 and PostgreSQL's 65,535).
ROWS_PER_STATEMENT = 100
# Any fixed number: the advisory lock taken while creating the tables.
_PG_SCHEMA_LOCK = 7_415_290_361


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the two databases."""

    placeholder: str
    begin: str | None  # statement that opens a write transaction (None: the driver opens one)
    schema_lock: str | None  # taken inside the transaction that creates the tables
    # Batches go in by COPY through a per-connection staging table (PostgreSQL), else by
    # multi-row INSERT (SQLite).
    copy: bool


SQLITE = Dialect("?", "BEGIN IMMEDIATE", None, copy=False)
POSTGRES = Dialect("%s", None, f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})", copy=True)
# The staging table of each table, for COPY: private to the connection, emptied at each commit.
_STAGING = "{table}_in"


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one maintenance pass removed."""

    deleted: int  # rows past store.retention_days
    cleared: int  # rows whose captured text was cleared (capture age or size cap)


def _fast_sqlite_binding() -> None:
    """Bind None and bools without the sqlite3 module's adapter search.

    For a value that is not exactly an int, float, str or bytes, the module looks for an
    adapter (a tuple, a dict lookup, two attribute lookups), most of the cost of binding a
    row of ours. Registered adapters are found in the dict and bind the same values (NULL,
    0/1), so registering them changes nothing else in the process.
    """
    none: Callable[[None], None] = cast(Callable[[None], None], {}.get)  # a C call returning None
    sqlite3.register_adapter(type(None), none)
    sqlite3.register_adapter(bool, int)


def sqlite_path(store: StoreConfig) -> Path:
    """The SQLite file of a `kind: sqlite` store."""
    return store.data_dir / SQLITE_FILE


class Database:
    """One connection, used by one thread at a time (the store's writer, or a reader)."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect
        self._inserts: dict[tuple[str, int], str] = {}

    @classmethod
    def connect(cls, store: StoreConfig, *, create: bool = True) -> Database | None:
        """Open the store's database and make sure its tables exist.

        With `create=False` (readers), a SQLite file that does not exist yet is not
        created: None is returned instead.
        """
        if store.kind == "sqlite":
            path = sqlite_path(store)
            if not create and not path.exists():
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            _fast_sqlite_binding()
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE), so two
            # processes never both hold a read lock and then wait on each other to write.
            lite = sqlite3.connect(
                path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            lite.execute("PRAGMA journal_mode=WAL")
            lite.execute("PRAGMA synchronous=NORMAL")
            db = cls(lite, SQLITE)
        else:
            import psycopg

            assert store.dsn_env is not None  # checked by the config
            dsn = os.environ.get(store.dsn_env, "")
            pg = psycopg.connect(
                dsn,
                connect_timeout=PG_CONNECT_TIMEOUT_S,
                options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
                application_name="triage",
            )
            db = cls(pg, POSTGRES)
        try:
            db.ensure_schema()
        except BaseException:
            db.close()
            raise
        return db

    def _begin(self) -> Any:
        cur = self.conn.cursor()
        if self.dialect.begin is not None:
            cur.execute(self.dialect.begin)
        return cur

    def ensure_schema(self) -> None:
        """Create the tables and indexes when missing, and record the schema version."""
        cur = self._begin()
        try:
            if self.dialect.schema_lock is not None:
                cur.execute(self.dialect.schema_lock)
            for statement in ddl():
                cur.execute(statement)
            if self.dialect.copy:
                for table in (REQUESTS, SHADOWS):
                    cur.execute(
                        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING.format(table=table)} "
                        f"(LIKE {table}) ON COMMIT DELETE ROWS"
                    )
            p = self.dialect.placeholder
            cur.execute(
                f"INSERT INTO triage_store_meta (name, value) VALUES ({p}, {p}) ON CONFLICT DO NOTHING",
                ("schema_version", str(SCHEMA_VERSION)),
            )
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise

    def write(self, requests: Sequence[tuple[Any, ...]], shadows: Sequence[tuple[Any, ...]]) -> None:
        """Insert one batch in one transaction (rows already there are skipped)."""
        cur = self._begin()
        try:
            put = self._copy if self.dialect.copy else self._insert
            put(cur, REQUESTS, REQUEST_COLUMNS, requests)
            put(cur, SHADOWS, SHADOW_COLUMNS, shadows)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise

    def _insert(
        self, cur: Any, table: str, columns: tuple[tuple[str, str], ...], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        # Many rows per statement: the driver hands the GIL back to the event loop around each
        # statement it runs, and every handover costs the loop a thread switch on its core.
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            key = (table, len(chunk))
            sql = self._inserts.get(key)
            if sql is None:
                sql = self._inserts[key] = insert_sql(table, columns, self.dialect.placeholder, len(chunk))
            cur.execute(sql, [value for row in chunk for value in row])

    @staticmethod
    def _copy(
        cur: Any, table: str, columns: tuple[tuple[str, str], ...], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        # COPY costs a few microseconds a row where psycopg's parameter binding costs tens;
        # COPY cannot skip rows already written, so it fills the staging table and one
        # INSERT ... SELECT moves the new rows over.
        if not rows:
            return
        staging = _STAGING.format(table=table)
        with cur.copy(f"COPY {staging} ({', '.join(row_columns(columns))}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(f"INSERT INTO {table} SELECT * FROM {staging} ON CONFLICT DO NOTHING")

    def prune(
        self,
        now: float,
        retention_days: float | None,
        capture_days: float | None,
        capture_max_bytes: int | None,
    ) -> Pruned:
        """Delete rows past retention; clear captured text past its age or over the size cap.

        The size cap keeps the newest text: the oldest rows with text are cleared until
        what remains fits.
        """
        p = self.dialect.placeholder
        deleted = cleared = 0
        cur = self._begin()
        try:
            if retention_days is not None:
                for table in (REQUESTS, SHADOWS):
                    cur.execute(f"DELETE FROM {table} WHERE ts < {p}", (now - retention_days * 86400,))
                    deleted += max(cur.rowcount, 0)
            if capture_days is not None:
                cleared += self._clear_text(cur, f"ts < {p}", now - capture_days * 86400)
            if capture_max_bytes is not None:
                cur.execute(
                    "SELECT ts FROM (SELECT ts, SUM(text_bytes) OVER "
                    "(ORDER BY ts DESC ROWS UNBOUNDED PRECEDING) AS kept FROM "
                    f"(SELECT ts, text_bytes FROM {REQUESTS} WHERE text_bytes > 0 UNION ALL "
                    f"SELECT ts, text_bytes FROM {SHADOWS} WHERE text_bytes > 0) AS t) AS k "
                    f"WHERE kept > {p} ORDER BY ts DESC LIMIT 1",
                    (capture_max_bytes,),
                )
                row = cur.fetchone()
                if row is not None:
                    cleared += self._clear_text(cur, f"ts <= {p}", row[0])
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return Pruned(deleted, cleared)

    @staticmethod
    def _clear_text(cur: Any, where: str, value: float) -> int:
        n = 0
        for table, columns in (
            (REQUESTS, "prompt = NULL, messages = NULL, answer = NULL"),
            (SHADOWS, "teacher_answer = NULL"),
        ):
            cur.execute(
                f"UPDATE {table} SET {columns}, text_bytes = 0 WHERE text_bytes > 0 AND {where}", (value,)
            )
            n += max(cur.rowcount, 0)
        return n

    def requests_page(
        self, since: float | None, until: float | None, after: tuple[float, str, int] | None, limit: int
    ) -> list[tuple[Any, ...]]:
        """Up to `limit` request rows (writer, seq, then `REQUEST_COLUMNS`) in (ts, writer, seq) order,
        from `since` (inclusive) to `until` (exclusive), after the row keyed `after`."""
        p = self.dialect.placeholder
        where: list[str] = []
        args: list[Any] = []
        if since is not None:
            where.append(f"ts >= {p}")
            args.append(since)
        if until is not None:
            where.append(f"ts < {p}")
            args.append(until)
        if after is not None:
            where.append(f"(ts, writer, seq) > ({p}, {p}, {p})")
            args.extend(after)
        cols = ", ".join(["writer", "seq", *(c for c, _ in REQUEST_COLUMNS)])
        sql = f"SELECT {cols} FROM {REQUESTS}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY ts, writer, seq LIMIT {int(limit)}"
        return self._fetch(sql, args)

    def shadows_for(self, request_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Shadow rows (writer, then `SHADOW_COLUMNS`) of these request ids, oldest first."""
        if not request_ids:
            return []
        marks = ", ".join([self.dialect.placeholder] * len(request_ids))
        cols = ", ".join(["writer", *(c for c, _ in SHADOW_COLUMNS)])
        return self._fetch(
            f"SELECT {cols} FROM {SHADOWS} WHERE request_id IN ({marks}) ORDER BY ts, writer, seq",
            list(request_ids),
        )

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, args)
            rows: list[tuple[Any, ...]] = cur.fetchall()
        finally:
            cur.close()
        if self.dialect is POSTGRES:
            self.conn.rollback()  # end the read's transaction, so it holds no snapshot
        return rows

    def count(self, table: str = REQUESTS) -> int:
        """Rows in a table."""
        ((n,),) = self._fetch(f"SELECT COUNT(*) FROM {table}", ())
        return int(n)

    def close(self) -> None:
        """Close the connection (never raises)."""
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - a dead server's connection may fail to close
            pass
