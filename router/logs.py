"""The gateway's log lines: one per request (the access log) and one per notable event.

Two formats, chosen by `server.log_format` or `triage serve --log-format`:

- plain: `2026-11-28T01:02:03.456Z INFO triage.access request_id=... status=200 ...`
- json:  one object a line, `{"ts": ..., "level": ..., "logger": ..., "msg": ..., <fields>}`

Fields are passed as a mapping in `extra={"fields": {...}}`, so each formatter
renders the same facts. Values come from config (model and key names), fixed
vocabularies (reasons) or numbers: never a prompt, a key or an upstream URL.

Loggers: `triage` (start-up, reloads), `triage.access` (one line per completion
request, rejected ones included), `triage.upstream` (fallbacks, breaker
transitions, upstream failures).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

import orjson

__all__ = ["ACCESS", "EVENTS", "UPSTREAM", "configure", "event"]

ACCESS = logging.getLogger("triage.access")
UPSTREAM = logging.getLogger("triage.upstream")
EVENTS = logging.getLogger("triage")

LogFormat = Literal["plain", "json"]


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def _timestamp(record: logging.LogRecord) -> str:
    # strftime once a second: the access log writes a line per request.
    secs = int(record.created)
    if secs != _second[0]:
        _second[0], _second[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{_second[1]}.{int((record.created - secs) * 1000):03d}Z"


def _plain_value(value: Any) -> str:
    if value is None:
        return "-"
    if value.__class__ is str:
        # Quote anything a reader could mistake for a field boundary.
        if " " in value or "=" in value or "\n" in value or not value:
            return orjson.dumps(value).decode()
        return value
    return str(value)


class PlainFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger> <message> key=value ...`: easy to read and to grep."""

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, "fields", None) or {}
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if fields:
            line += " " + " ".join(f"{k}={_plain_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            obj.update(fields)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj, default=str).decode()


def configure(fmt: LogFormat, level: str) -> None:
    """Send every `triage*` line (and uvicorn's own) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Facts no line prints; skipping them makes each record cheaper to build.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in ("uvicorn", "uvicorn.error"):
        # uvicorn installs its own handlers when it starts unless told not to; ours format
        # its lines the same way as the gateway's.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log one event with structured fields (skipped cheaply when the level is off)."""
    if logger.isEnabledFor(level):
        # makeRecord + handle is what Logger.log does, minus the stack walk that finds
        # the caller's file and line, which no line prints.
        record = logger.makeRecord(logger.name, level, "", 0, message, (), None)
        record.fields = fields
        logger.handle(record)
