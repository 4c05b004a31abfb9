"""Stored traffic by workload: each request's task family, and per-family or per-key totals.

A request's family is the client's own tag (the `x-triage-family` header) when it sent
one, else what `classifiers.family` reads from its captured prompt, else `unknown`
(nothing was captured). `Workloads` adds requests up per family or per API key: the
share the students served, their agreement with the teacher in shadow, how often a
quality check escalated them, and what routing saved against a teacher-only deployment.
`triage replay` prints these tables next to what a candidate config would do.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from classifiers.base import prompt_text
from classifiers.family import family_of
from router.config import Config, StoreConfig
from router.records import RequestRecord, ShadowRecord

if TYPE_CHECKING:
    from router.store import StoredRequest

__all__ = [
    "UNKNOWN",
    "StoreUnreadable",
    "WorkloadRow",
    "Workloads",
    "add_store_command",
    "load_stored",
    "no_requests",
    "parse_score",
    "parse_when",
    "percent",
    "ratio",
    "request_family",
    "stored_traffic",
]

UNKNOWN = "unknown"
NO_KEY = "(no key)"


def request_family(record: RequestRecord) -> str:
    """The request's task family: the client's tag, else the tagger's reading of the captured prompt."""
    if record.family:
        return record.family
    text = record.prompt if isinstance(record.prompt, str) else ""
    if not text.strip() and isinstance(record.messages, list):
        # (a store written by another version, or by hand, may hold anything here)
        text = prompt_text([m for m in record.messages if isinstance(m, dict)])
    return family_of(text) if text.strip() else UNKNOWN


@dataclass(slots=True)
class WorkloadRow:
    """What happened to one workload's requests, and the share a candidate would route to students."""

    name: str
    requests: int = 0
    student_first: int = 0  # first sent to a student
    student_served: int = 0  # answered by a student
    escalations: int = 0
    shadows: int = 0
    agreement_sum: float = 0.0
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    candidate_student: float = 0.0  # requests the candidate routes to a student
    candidate_cost_usd: float = 0.0

    @property
    def student_share(self) -> float:
        """Share of the workload's requests a student answered."""
        return ratio(self.student_served, self.requests)

    @property
    def agreement(self) -> float:
        """Mean shadow agreement with the teacher (NaN without shadow samples)."""
        return ratio(self.agreement_sum, self.shadows)

    @property
    def escalation_rate(self) -> float:
        """Share of student-routed requests a quality check escalated to the teacher."""
        return ratio(self.escalations, self.student_first)

    @property
    def savings_usd(self) -> float:
        """Teacher-only spend minus the spend."""
        return self.teacher_cost_usd - self.cost_usd

    @property
    def candidate_share(self) -> float:
        """Share of the workload the candidate routes to a student."""
        return ratio(self.candidate_student, self.requests)

    @property
    def candidate_savings_usd(self) -> float:
        """Teacher-only spend minus the candidate's projected spend."""
        return self.teacher_cost_usd - self.candidate_cost_usd


class Workloads:
    """Per-workload totals, grouped by a name taken from each request (its family or its key)."""

    def __init__(self, title: str, name_of: Callable[[RequestRecord], str]) -> None:
        self.title = title
        self._name_of = name_of
        self.rows: dict[str, WorkloadRow] = {}

    @classmethod
    def by_family(cls) -> Workloads:
        """Totals per task family."""
        return cls("family", request_family)

    @classmethod
    def by_key(cls) -> Workloads:
        """Totals per API key name."""
        return cls("key", lambda r: r.key or NO_KEY)

    def add(
        self,
        record: RequestRecord,
        shadows: Iterable[ShadowRecord],
        students: frozenset[str],
        candidate_student: bool = False,
        candidate_cost_usd: float = 0.0,
    ) -> None:
        """Count one request (and what the candidate would do with it)."""
        name = self._name_of(record)
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = WorkloadRow(name)
        row.requests += 1
        if record.attempted and record.attempted[0] in students:
            row.student_first += 1
            row.escalations += record.escalated
        row.student_served += record.model in students
        for shadow in shadows:
            row.shadows += 1
            row.agreement_sum += shadow.agreement
        row.cost_usd += record.cost_usd
        row.teacher_cost_usd += record.teacher_cost_usd
        row.candidate_student += candidate_student
        row.candidate_cost_usd += candidate_cost_usd

    def render(self, candidate: bool) -> list[str]:
        """The table's lines, largest workload first; `candidate` adds the candidate's columns."""
        head = (
            f"{'by ' + self.title:<16}{'requests':>9}{'student':>9}{'agreement':>15}"
            f"{'escalated':>10}{'savings':>17}"
        )
        if candidate:
            head += f"{'cand. student':>15}{'cand. savings':>15}"
        lines = [head]
        for row in sorted(self.rows.values(), key=lambda r: (-r.requests, r.name)):
            saved = _pct(row.savings_usd, row.teacher_cost_usd)
            agree = "—" if not row.shadows else f"{row.agreement:.3f} (n={row.shadows})"
            line = (
                f"{row.name[:15]:<16}{row.requests:>9,}{percent(row.student_share):>9}{agree:>15}"
                f"{percent(row.escalation_rate):>10}{f'${row.savings_usd:,.4f} ({saved})':>17}"
            )
            if candidate:
                line += f"{percent(row.candidate_share):>15}{f'${row.candidate_savings_usd:,.4f}':>15}"
            lines.append(line)
        return lines


def ratio(part: float, whole: float) -> float:
    """part / whole, NaN when there is no whole."""
    return part / whole if whole > 0 else math.nan


def load_stored(path: Path) -> Config | None:
    """The config whose store a command reads, or None after saying why not."""
    from router.__main__ import _load

    config = _load(path, secrets_needed=False)
    if config is not None and config.store is None:
        sys.stderr.write(f"triage: {path} has no `store:` section: there is no stored traffic\n")
        return None
    return config


def percent(value: float) -> str:
    """A share as a percentage, or a dash for none."""
    return "—" if math.isnan(value) else f"{value:.1%}"


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole > 0 else "—"


def parse_when(text: str) -> float:
    """A time on the command line: unix seconds, or an ISO date or date-time (UTC unless it says)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give unix seconds or an ISO date (2026-11-01, 2026-11-01T12:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_score(text: str) -> float:
    """A classifier score on the command line: a finite number."""
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise argparse.ArgumentTypeError(f"{text!r} is not a score: give a number such as 0.4")
    return score


def no_requests(since: float | None, until: float | None) -> str:
    """What a command says when the store holds no request in its window."""
    window = ""
    if since is not None:
        window += f" since {_when(since)}"
    if until is not None:
        window += f" before {_when(until)}"
    return f"no stored requests{window}: nothing to read"


def add_store_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, doc: str | None
) -> argparse.ArgumentParser:
    """A subcommand that reads stored traffic, with `--since`/`--until` to choose the requests."""
    parser = sub.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--since", type=parse_when, help="first request time read (unix seconds or ISO date, UTC)"
    )
    parser.add_argument("--until", type=parse_when, help="read requests before this time")
    return parser


class StoreUnreadable(Exception):
    """The traffic store cannot be read; the message says which store and why, on one line."""


def stored_traffic(store: StoreConfig, since: float | None, until: float | None) -> Iterator[StoredRequest]:
    """`read_traffic` for a command: the requests in [since, until), oldest first.

    A window that ends before it starts and a SQLite store no gateway has written yet raise
    `StoreUnreadable` at once; the database's own failures (not a database, unreachable,
    refused) raise it while reading.
    """
    from router.store import sqlite_path

    if since is not None and until is not None and since >= until:
        raise StoreUnreadable(f"--since ({_when(since)}) must be before --until ({_when(until)})")
    if store.kind == "sqlite":
        where = str(sqlite_path(store))
        if not sqlite_path(store).exists():
            raise StoreUnreadable(f"no traffic store at {where}: no gateway with this store has run yet")
    else:
        where = f"the PostgreSQL database in ${store.dsn_env}"
    return _read(store, since, until, where)


def _read(
    store: StoreConfig, since: float | None, until: float | None, where: str
) -> Iterator[StoredRequest]:
    from router.store import read_traffic

    failures: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    if store.kind == "postgres":
        import psycopg

        failures += (psycopg.Error,)
    try:
        yield from read_traffic(store, since, until)
    except failures as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreUnreadable(f"cannot read the traffic store at {where}: {detail}") from None


def _when(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"
