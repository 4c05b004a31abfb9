"""Shadow evaluation: replay a sample of student-served requests on the teacher, off the request path.

Exploration is the other direction: a sample of teacher-served, classifier-routed requests
is also asked of the student that was next in line, so the prompts above the threshold get
outcomes too (`triage learn` labels both alike). Both directions share the cap, the
metrics (by student) and `ShadowRecord`; the extra call's cost is shadow spend, never
served spend.

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
from dataclasses import dataclass
from typing import Any

import orjson

from router.accounting import Accountant, Usage
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


@dataclass(frozen=True, slots=True)
class _Job:
    """One comparison: ask `pool` the request `served_text` answered, for `student`'s outcome."""

    student: ModelConfig
    pool: ModelPool  # the teacher's when shadowing, the student's when exploring
    wire: WireFormat
    payload: dict[str, Any]
    served_text: str  # the answer the client got
    served_usage: Usage | None
    request_id: str
    capture: bool


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
        explore_rate: float = 0.0,
        student_pools: dict[str, ModelPool] | None = None,
    ) -> None:
        self.rate = rate
        self.explore_rate = explore_rate
        self._students = student_pools or {}
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

    def sample_explore(self) -> bool:
        """Draw whether the next teacher-served, classifier-routed request is explored."""
        return self.explore_rate > 0 and self._random.random() < self.explore_rate

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
        return self._launch(_Job(student, self._pool, wire, payload, student_text, None, request_id, capture))

    def explore(
        self,
        student: ModelConfig,
        wire: WireFormat,
        payload: dict[str, Any],
        teacher_text: str,
        teacher_usage: Usage | None,
        request_id: str,
        capture: bool = False,
    ) -> bool:
        """Ask `student` a sampled teacher-served request and compare, if a slot is free.

        The mirror of `start`: `payload` is the request as the teacher got it, in `wire`'s
        format (a student that does not speak it natively is not asked), and the record is
        the same `ShadowRecord` naming the student, with the served teacher answer.
        """
        pool = self._students.get(student.name)
        if pool is None:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return False
        return self._launch(
            _Job(student, pool, wire, payload, teacher_text, teacher_usage, request_id, capture)
        )

    def _launch(self, job: _Job) -> bool:
        if self._running >= self._max or job.wire.name not in job.pool.model.apis:
            self._metrics.shadow_requests.labels(job.student.name, "skipped").inc()
            return False
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, job: _Job) -> None:
        student, pool, served_text, served_usage = job.student, job.pool, job.served_text, job.served_usage
        try:
            got = await self._ask(student, pool, job.wire, job.payload, job.request_id)
            if got is None:
                return
            text, usage = got
            exploring = pool is not self._pool
            if usage is not None:
                cost = (
                    self._accountant.cost(student.name, usage)
                    if exploring
                    else self._accountant.teacher_cost(usage)
                )
                self._metrics.shadow_cost.labels(student.name).inc(cost)
            # Exploring: the new text is the student's and the served one the teacher's.
            student_text, teacher_text = (text, served_text) if exploring else (served_text, text)
            teacher_usage = served_usage if exploring else usage
            score = agreement(student_text, teacher_text)
            self._metrics.shadow_agreement.labels(student.name).observe(score)
            self._metrics.shadow_requests.labels(student.name, "compared").inc()
            if self._recorder is not None:
                self._recorder.shadow(
                    ShadowRecord(
                        ts=time.time(),
                        request_id=job.request_id,
                        student=student.name,
                        agreement=score,
                        teacher_answer=teacher_text if job.capture else None,
                        teacher_prompt_tokens=0 if teacher_usage is None else teacher_usage.prompt_tokens,
                        teacher_completion_tokens=0
                        if teacher_usage is None
                        else teacher_usage.completion_tokens,
                    )
                )
        finally:
            self._running -= 1

    async def _ask(
        self,
        student: ModelConfig,
        pool: ModelPool,
        wire: WireFormat,
        payload: dict[str, Any],
        request_id: str,
    ) -> tuple[str, Usage | None] | None:
        """The other model's answer (None, counted, when it was skipped or failed)."""
        body = wire.upstream_payload(payload, pool.model.upstream_model, False)
        body.pop("stream", None)
        body.pop("stream_options", None)
        idx = pool.pick(set())
        if idx is None:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return None
        verdict = False
        try:
            # Never queue behind client requests for a connection: skip instead.
            reply = await pool.post(
                idx, wire.upstream_path, orjson.dumps(body), request_id + "-shadow", wait=False
            )
            pool.mark_ok(idx)
            verdict = True
            parsed = orjson.loads(reply.content)
        except Overloaded:
            self._metrics.shadow_requests.labels(student.name, "skipped").inc()
            return None
        except UpstreamError as exc:
            if isinstance(exc, UpstreamStatus) and not exc.retryable:
                pool.mark_ok(idx)  # the model answered; the request was the problem
            else:
                pool.mark_failed(idx)
            verdict = True
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return None
        except orjson.JSONDecodeError:
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return None
        finally:
            if not verdict:
                pool.release(idx)  # the breaker claim ends without a verdict
        if not wire.well_shaped(parsed):
            self._metrics.shadow_requests.labels(student.name, "error").inc()
            return None
        return wire.answer(parsed).text, wire.usage(parsed)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait briefly for running comparisons, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
