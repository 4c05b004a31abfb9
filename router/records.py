"""What the gateway remembers of each request: one record per request, handed to whoever keeps them.

`Exchange.finish` builds a `RequestRecord` once a request's outcome is known; a shadow
comparison that ends later adds a `ShadowRecord` under the same request id. The
`Recorder` keeps the most recent requests in memory (for the dashboard) and passes
every record to its sinks (the traffic store). Adding a record never blocks and never
raises: a sink that cannot keep up drops records and counts them itself, and a sink that
raises anyway is logged and skipped, so it fails no request and starves no other sink.

Records hold names from config, fixed vocabularies and numbers. The prompt and the
answer are there only when capture sampled the request (`captured`).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["PASSED", "RecordSink", "Recorder", "RequestRecord", "ShadowRecord", "failed_check"]

# The quality verdict of a student answer every check passed (otherwise: the failed check's name).
PASSED = "passed"

# Recent requests kept in memory when config does not say.
DEFAULT_RECENT = 10_000

log = logging.getLogger("triage")


@dataclass(slots=True)
class RequestRecord:
    """One request's outcome: who asked what, where it went, what it cost, how it went."""

    ts: float  # unix time the request arrived
    request_id: str
    key: str | None  # key name (never the key), None when auth is off
    api: str  # the client's wire format (`config.API_NAMES`)
    requested: str | None  # the `model` field as sent
    model: str | None  # the model whose answer was served; None when none answered
    attempted: tuple[str, ...]  # every model sent an attempt, in order
    reason: str  # routing reason (`routing.REASONS`)
    score: float | None  # complexity score, when scored
    threshold_factor: float  # the share controller's factor when the request was routed
    status: int
    stream: bool
    prompt_tokens: int  # over every attempt
    completion_tokens: int
    cost_usd: float  # every attempt paid for
    teacher_cost_usd: float  # what a teacher-only deployment would have paid for the served answer
    latency_ms: float
    ttft_ms: float | None  # streams: first token; None otherwise
    upstream_ms: float
    fallback: str | None  # why the request fell back to the teacher (a check or an error kind)
    error: str | None  # why the request failed, when it did
    quality: str | None  # PASSED, the failed check's name, or None when no check ran
    shadowed: bool  # a shadow comparison was started; its ShadowRecord follows if the teacher answered
    captured: bool = False
    prompt: str | None = None  # the scorer's text of the request (captured, redacted)
    messages: list[dict[str, Any]] | None = None  # the request as chat messages (captured)
    answer: str | None = None  # the served answer's text (captured)
    family: str | None = None  # the client's own workload tag (`x-triage-family`), when it sent one

    @property
    def escalated(self) -> bool:
        """Whether a quality check failed the student's answer (and the teacher was asked instead)."""
        return failed_check(self.quality)


def failed_check(quality: str | None) -> bool:
    """Whether a quality verdict names a failed check."""
    return quality is not None and quality != PASSED


@dataclass(slots=True)
class ShadowRecord:
    """A shadow comparison of a student's answer with the teacher's, for an earlier request."""

    ts: float
    request_id: str
    student: str
    agreement: float  # `shadow.agreement`, in [0, 1]
    teacher_answer: str | None  # the teacher's text, when the request was captured
    teacher_prompt_tokens: int
    teacher_completion_tokens: int


class RecordSink(Protocol):
    """Somewhere records go (the traffic store); every call returns at once."""

    def sample_capture(self) -> bool:
        """Draw whether the request starting now has its prompt and answer captured."""
        ...

    def request(self, record: RequestRecord) -> None:
        """Take one request's record."""
        ...

    def shadow(self, record: ShadowRecord) -> None:
        """Take one shadow comparison's record."""
        ...


class Recorder:
    """The recent requests in memory, and the sinks every record goes to.

    One per process, kept across config reloads (the app owns it, each gateway uses it).
    """

    def __init__(self, recent: int = DEFAULT_RECENT) -> None:
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        self.sinks: list[RecordSink] = []
        # Keep the prompt of every request a shadow comparison or a failed check labels
        # (`capture.labelled`), even when capture did not sample it.
        self.capture_labelled = False
        self._logged: set[str] = set()

    def request(self, record: RequestRecord) -> None:
        """Remember one request and pass it on."""
        self.recent.append(record)
        for sink in self.sinks:
            try:
                sink.request(record)
            except Exception:
                self._failed(sink, "request")

    def shadow(self, record: ShadowRecord) -> None:
        """Pass a shadow comparison on."""
        for sink in self.sinks:
            try:
                sink.shadow(record)
            except Exception:
                self._failed(sink, "shadow")

    def wants_capture(self) -> bool:
        """Whether the next request's prompt and answer should be captured."""
        for sink in self.sinks:
            try:
                if sink.sample_capture():
                    return True
            except Exception:
                self._failed(sink, "sample_capture")
        return False

    def _failed(self, sink: RecordSink, call: str) -> None:
        # Called from a request's own path: the record is lost to this sink, the request goes on.
        # Only the first failure of each sink is logged with its traceback (not one per request).
        name = type(sink).__name__
        if name in self._logged:
            return
        self._logged.add(name)
        log.exception("record sink %s raised in %s(); its records are skipped while it does", name, call)
