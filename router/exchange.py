"""One client request on its way through the gateway: what was asked, decided and spent."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.accounting import Usage
from router.auth import KeyState
from router.config import ModelConfig
from router.endpoints import FORMATS, Prompt, WireFormat
from router.endpoints.base import Translation
from router.errors import GatewayError
from router.gateway import Gateway
from router.logs import ACCESS, UPSTREAM, event
from router.records import RequestRecord, failed_check
from router.routing import Decision

__all__ = ["Exchange", "Leg", "QualityFailure"]

# Most tokens one request's prompt (or an unbounded completion) can plausibly use.
MAX_PLAUSIBLE_TOKENS = 1 << 21
_CHAT = FORMATS["chat"]


class QualityFailure(GatewayError):
    """A student's answer failed a quality check; the request escalates to the teacher."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} answer failed the {reason} check")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Leg:
    """How one model is asked: in the client's format, or in chat completions and translated back."""

    wire: WireFormat  # the format the upstream answers in
    translation: Translation | None  # None: the client's own format, passed through


# Built once: every request of a format takes one of its two legs.
_DIRECT = {name: Leg(f, None) for name, f in FORMATS.items()}
_VIA_CHAT = {name: Leg(_CHAT, f.via_chat) for name, f in FORMATS.items() if f.via_chat is not None}


@dataclass(slots=True)
class Exchange:
    """Per-request facts shared by the attempt loop, the stream pump and the response."""

    gateway: Gateway
    fmt: WireFormat  # the client's wire format
    request_id: str
    started: float
    payload: dict[str, Any]
    prompt: Prompt
    decision: Decision
    stream: bool
    client_wants_usage: bool
    quality_on: bool
    fallback_on: bool
    escalation_budget_usd: float | None
    key: KeyState | None = None
    upstream_s: float = 0.0
    fallback_reason: str | None = None
    strip_logprobs: bool = False
    # Models sent an attempt, in order (a model appears once per attempt).
    attempted: list[str] = field(default_factory=list)
    # The streaming response once one is built (it tells whether its pump started).
    response: Any = None
    # What the request's record says beyond the above (`router.records`).
    arrived: float = 0.0  # unix time
    threshold_factor: float = 1.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    ttft_s: float | None = None
    quality: str | None = None  # "passed", or the failed check
    shadowed: bool = False
    capture: bool = False  # the prompt and the answer go into the record
    answer_text: str | None = None  # the served answer, when captured
    family: str | None = None  # the client's workload tag (x-triage-family header)
    finished: bool = False

    def leg(self, model: ModelConfig) -> Leg:
        """How `model` is asked for this request."""
        name = self.fmt.name
        if name in model.apis or name not in _VIA_CHAT:
            return _DIRECT[name]
        return _VIA_CHAT[name]

    def headers(self, model: ModelConfig | None, reason: str) -> dict[str, str]:
        """The x-triage-* response headers.

        `model` is the model whose answer (or own error) this response carries; None when
        no model answered (timeouts, unreachable upstreams, overload), so `x-triage-model`
        never names a model that did not answer. `x-triage-attempted` lists every attempt.
        """
        h = {"x-triage-reason": reason, "x-request-id": self.request_id}
        if model is not None:
            h["x-triage-model"] = model.name
        if self.attempted and (model is None or len(self.attempted) > 1):
            h["x-triage-attempted"] = ",".join(self.attempted)
        if self.decision.score is not None:
            h["x-triage-score"] = f"{self.decision.score:.3f}"
        if self.fallback_reason is not None:
            h["x-triage-fallback"] = self.fallback_reason
        return h

    def checks_apply(self, model: ModelConfig) -> bool:
        """Whether this model's answer is checked before it is served."""
        return self.quality_on and model.role == "student"

    def explores(self, model: ModelConfig) -> bool:
        """Draw whether the answer `model` serves, the decision's own choice with a student next
        in line, is also asked of that student (`routing.explore_rate`)."""
        return (
            model is self.decision.model
            and self.decision.next_student is not None
            and self.gateway.shadow.sample_explore()
        )

    def compare(self, model: ModelConfig, leg: Leg, text: str, usage: Usage | None, exploring: bool) -> None:
        """Start the sampled comparison of the answer `model` served (`text`, `usage` as the
        upstream reported it): with the teacher when shadowing a student, or with the next
        student when exploring. `shadowed` says whether one started."""
        shadow = self.gateway.shadow
        payload = self.upstream_payload(leg)
        if not exploring:
            self.shadowed = shadow.start(model, leg.wire, payload, text, self.request_id, self.capture)
        elif self.decision.next_student is not None:
            self.shadowed = shadow.explore(
                self.decision.next_student, leg.wire, payload, text, usage, self.request_id, self.capture
            )

    def upstream_payload(self, leg: Leg) -> dict[str, Any]:
        """The request in the leg's wire format, before model-specific fields."""
        if leg.translation is None:
            return self.payload
        prompt = self.prompt
        if prompt.as_chat is None:  # (a format that did not read its prompt through chat)
            prompt.as_chat = leg.translation.request(self.payload)
        return prompt.as_chat

    def body_for(self, model: ModelConfig, leg: Leg) -> bytes:
        """The upstream request body for one model."""
        logprobs = (
            self.checks_apply(model) and model.checks.min_mean_logprob is not None and leg.wire.logprobs
        )
        payload = self.upstream_payload(leg)
        self.strip_logprobs = logprobs and not payload.get("logprobs")
        return orjson.dumps(leg.wire.upstream_payload(payload, model.upstream_model, logprobs))

    def estimate(self, completion_tokens: int) -> Usage:
        """Usage estimated from the prompt size when the upstream reported none."""
        prompt = self.gateway.policy.estimate_tokens(self.prompt.chars, self.prompt.images)
        return Usage(prompt, completion_tokens, estimated=True)

    def may_escalate(self, student_usage: Usage) -> bool:
        """Whether the teacher call for a quality escalation fits the request's budget."""
        if not self.fallback_on:
            return False
        if self.escalation_budget_usd is None:
            return True
        budget = self.prompt.budget
        completion = budget if budget > 0 else student_usage.completion_tokens
        prompt = max(student_usage.prompt_tokens, self.estimate(0).prompt_tokens)
        teacher = self.gateway.accountant.teacher_cost(Usage(prompt, completion))
        return teacher <= self.escalation_budget_usd

    def plausible(self, usage: Usage) -> Usage:
        """The upstream's usage, clipped to what one request can use.

        A prompt is at most `MAX_PLAUSIBLE_TOKENS` (beyond any model's context today), a
        completion at most `max_tokens` per choice when the client set it. Without this
        bound one hostile or broken answer claiming 2**53 tokens would add billions of
        dollars to the cost metrics and lock its key out of its budget until a restart.
        """
        budget = self.prompt.budget
        n = self.payload.get("n")
        per_choice = budget if budget > 0 else MAX_PLAUSIBLE_TOKENS
        completion_cap = per_choice * (n if isinstance(n, int) and n > 0 else 1)
        if usage.prompt_tokens <= MAX_PLAUSIBLE_TOKENS and usage.completion_tokens <= completion_cap:
            return usage
        event(
            UPSTREAM,
            logging.WARNING,
            "implausible usage clipped",
            request_id=self.request_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        return Usage(
            min(usage.prompt_tokens, MAX_PLAUSIBLE_TOKENS),
            min(usage.completion_tokens, completion_cap),
            estimated=True,
        )

    def record(self, model: str, usage: Usage, served: bool) -> None:
        """Count an attempt's tokens and cost, globally and against the client's key."""
        if not usage.estimated:
            usage = self.plausible(usage)
        cost, equivalent = self.gateway.accountant.record(model, usage, served)
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += cost
        self.teacher_cost_usd += equivalent
        if self.key is not None:
            self.key.charge(usage.prompt_tokens + usage.completion_tokens, cost)
            self.gateway.metrics.key_cost.labels(self.key.name).inc(cost)

    def fail_quality(self, model: ModelConfig, reason: str, usage: Usage) -> QualityFailure:
        """Pay for the rejected attempt and count the escalation."""
        self.record(model.name, usage, served=False)
        self.gateway.metrics.fallbacks.labels(model.name, reason).inc()
        self.fallback_reason = reason
        self.quality = reason
        event(
            UPSTREAM,
            logging.WARNING,
            "quality check failed",
            request_id=self.request_id,
            model=model.name,
            check=reason,
        )
        return QualityFailure(model.name, reason)

    def client_left(self, model: str, reason: str) -> None:
        """The client disconnected before any of its answer was sent: count and log it."""
        self.gateway.metrics.client_disconnects.labels(model).inc()
        self.finish(model, reason, 499, answered=False, note="client_disconnected")

    def finish(
        self, model: str, reason: str, status: int, *, answered: bool = True, note: str | None = None
    ) -> None:
        """Count the request once its outcome is known, write its access-log line and its record.

        `answered` is False when `model` is only the last one tried (nobody answered);
        `note` says why a request failed.
        """
        if self.finished:  # (a stream whose client left after its pump ended)
            return
        self.finished = True
        m = self.gateway.metrics
        total = time.perf_counter() - self.started
        status_class = f"{status // 100}xx"
        m.requests.labels(model, reason, status_class).inc()
        m.api_requests.labels(self.fmt.name, status_class).inc()
        m.request_duration.labels(model).observe(total)
        m.overhead.observe(max(total - self.upstream_s, 0.0))
        if ACCESS.isEnabledFor(logging.INFO):
            score = self.decision.score
            event(
                ACCESS,
                logging.INFO,
                "request",
                request_id=self.request_id,
                key=None if self.key is None else self.key.name,
                endpoint=self.fmt.name,
                requested=self.payload.get("model"),
                model=model if answered else None,
                attempted=",".join(self.attempted) or None,
                reason=reason,
                score=None if score is None else round(score, 3),
                status=status,
                stream=self.stream,
                latency_ms=round(total * 1000, 1),
                upstream_ms=round(self.upstream_s * 1000, 1),
                fallback=self.fallback_reason,
                error=note,
            )
        self.gateway.recorder.request(self._record(model if answered else None, reason, status, total, note))

    def _record(
        self, model: str | None, reason: str, status: int, total_s: float, note: str | None
    ) -> RequestRecord:
        requested = self.payload.get("model")
        record = RequestRecord(
            ts=self.arrived,
            request_id=self.request_id,
            key=None if self.key is None else self.key.name,
            api=self.fmt.name,
            requested=requested if isinstance(requested, str) else None,
            model=model,
            attempted=tuple(self.attempted),
            reason=reason,
            score=self.decision.score,
            threshold_factor=self.threshold_factor,
            status=status,
            stream=self.stream,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
            teacher_cost_usd=self.teacher_cost_usd,
            latency_ms=total_s * 1000,
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1000,
            upstream_ms=self.upstream_s * 1000,
            fallback=self.fallback_reason,
            error=note,
            quality=self.quality,
            shadowed=self.shadowed,
            family=self.family,
        )
        if self.capture:
            record.captured = True
            record.prompt = self.prompt.text
            record.messages = self._chat_messages()
            record.answer = self.answer_text
        elif self.gateway.recorder.capture_labelled and (self.shadowed or failed_check(self.quality)):
            # An outcome labels this request (`triage learn`): keep what was asked, not the answer.
            record.captured = True
            record.prompt = self.prompt.text
            record.messages = self._chat_messages()
        return record

    def _chat_messages(self) -> list[dict[str, Any]] | None:
        """The request as chat messages: as sent, or as translated to chat; None for other shapes."""
        name = self.fmt.name
        if name == "chat":
            payload = self.payload
        elif name in _VIA_CHAT:
            payload = self.upstream_payload(_VIA_CHAT[name])
        else:
            return None
        messages = payload.get("messages")
        return messages if isinstance(messages, list) else None
