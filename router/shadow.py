"""Shadow evaluation: replay a sample of student-served requests on the teacher, off the request path.

The two answers are compared (final numeric answer when both have one, else
normalised exact match, else word-overlap similarity) and the agreement goes
to a histogram per student, so operators see live quality and can recalibrate.
A semaphore caps concurrent shadow calls; when it is full the sample is
skipped rather than queued, so shadowing can never build a backlog.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any

import orjson

from router.accounting import Accountant
from router.config import ModelConfig
from router.endpoints.base import WireFormat
from router.errors import Overloaded, UpstreamError, UpstreamStatus
from router.metrics import Metrics
from router.records import Recorder, ShadowRecord
from router.upstream import ModelPool

__all__ = ["Shadow", "agreement"]

log = logging.getLogger("triage.shadow")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"\w+")


def _final_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def agreement(student: str, teacher: str) -> float:
    """Agreement in [0, 1] between two answers to the same request."""
    a, b = student.strip(), teacher.strip()
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    na, nb = _final_number(a), _final_number(b)
    if na is not None and nb is not None:
        return 1.0 if abs(na - nb) <= 1e-6 * max(1.0, abs(nb)) else 0.0
    wa, wb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if wa == wb:
        return 1.0
    sa, sb = set(wa), set(wb)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


class Shadow:
    """Samples student answers and compares them with the teacher's in background tasks."""

    def __init__(
        self,
        rate: float,
        max_concurrency: int,
        teacher_pool: ModelPool,
        metrics: Metrics,
        accountant: Accountant,
        recorder: Recorder | None = None,
        seed: int | None = None,
    ) -> None:
        self.rate = rate
        self._max = max_concurrency
        # Counted when a task is created, not when it first runs, so a burst
        # cannot start more than the cap before any of them is scheduled.
        self._running = 0
        self._pool = teacher_pool
        self._metrics = metrics
        self._accountant = accountant
        self._recorder = recorder
        self._random = random.Random(seed)
        # Strong references: the event loop keeps only weak ones to tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def sample(self) -> bool:
        """Draw whether the next student-served request is shadowed."""
        return self.rate > 0 and self._random.random() < self.rate

    def start(
        self,
        student: ModelConfig,
        wire: WireFormat,
        payload: dict[str, Any],
        student_text: str,
        request_id: str,
        capture: bool = False,
    ) -> bool:
        """Start a shadow comparison of a sampled answer if a slot is free.

        `payload` is the request as the student got it, in `wire`'s format; a teacher that
        does not speak that format natively is not asked (the sample is skipped). The
        comparison's `ShadowRecord` carries the teacher's text when `capture` is set.
        """
        if self._running >= self._max or wire.name not in self._pool.model.apis:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return False
        self._running += 1
        task = asyncio.get_running_loop().create_task(
            self._run(student, wire, payload, student_text, request_id, capture)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self,
        student: ModelConfig,
        wire: WireFormat,
        payload: dict[str, Any],
        student_text: str,
        request_id: str,
        capture: bool,
    ) -> None:
        try:
            await self._compare(student, wire, payload, student_text, request_id, capture)
        finally:
            self._running -= 1

    async def _compare(
        self,
        student: ModelConfig,
        wire: WireFormat,
        payload: dict[str, Any],
        student_text: str,
        request_id: str,
        capture: bool,
    ) -> None:
        body = wire.upstream_payload(payload, self._pool.model.upstream_model, False)
        body.pop("stream", None)
        body.pop("stream_options", None)
        idx = self._pool.pick(set())
        if idx is None:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return
        verdict = False
        try:
            # Never queue behind client requests for a teacher connection: skip instead.
            reply = await self._pool.post(
                idx, wire.upstream_path, orjson.dumps(body), request_id + "-shadow", wait=False
            )
            self._pool.mark_ok(idx)
            verdict = True
            parsed = orjson.loads(reply.content)
        except Overloaded:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return
        except UpstreamError as exc:
            if isinstance(exc, UpstreamStatus) and not exc.retryable:
                self._pool.mark_ok(idx)  # the teacher answered; the request was the problem
            else:
                self._pool.mark_failed(idx)
            verdict = True
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return
        except orjson.JSONDecodeError:
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return
        finally:
            if not verdict:
                self._pool.release(idx)  # the breaker claim ends without a verdict
        if not wire.well_shaped(parsed):
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return
        usage = wire.usage(parsed)
        if usage is not None:
            self._metrics.shadow_cost.labels(student.name).inc(self._accountant.teacher_cost(usage))
        teacher_text = wire.answer(parsed).text
        score = agreement(student_text, teacher_text)
        self._metrics.shadow_agreement.labels(student.name).observe(score)
        self._metrics.shadow_requests.labels(student.name, "compared").inc()
        if self._recorder is not None:
            self._recorder.shadow(
                ShadowRecord(
                    ts=time.time(),
                    request_id=request_id,
                    student=student.name,
                    agreement=score,
                    teacher_answer=teacher_text if capture else None,
                    teacher_prompt_tokens=0 if usage is None else usage.prompt_tokens,
                    teacher_completion_tokens=0 if usage is None else usage.completion_tokens,
                )
            )

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait briefly for running comparisons, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
