"""Token usage and cost: what each attempt cost, and what the teacher would have cost.

Savings are `teacher_equivalent − cost`. Every attempt is paid for (a student
answer that was rejected and escalated costs its tokens), but only the answer
that was served counts toward the teacher-only counterfactual, because a
teacher-only deployment would have made exactly one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from router.config import Config
from router.metrics import Metrics

__all__ = ["Accountant", "Usage", "counted_usage", "token_count", "usage_from_body"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one upstream answer; `estimated` when the upstream reported none."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


def counted_usage(usage: Any, prompt_key: str, completion_key: str) -> Usage | None:
    """The usage in a `usage` object whose counts are under these keys (any JSON is safe here).

    Chat says `prompt_tokens`/`completion_tokens`, Responses and Messages `input_tokens`/`output_tokens`.
    """
    if not isinstance(usage, dict):
        return None
    prompt = usage.get(prompt_key)
    completion = usage.get(completion_key, 0)
    if token_count(prompt) and token_count(completion):
        return Usage(max(prompt, 0), max(completion, 0))
    return None


def token_count(value: Any) -> TypeGuard[int]:
    """Whether a value is a plausible token count."""
    # A bool is not a token count, and a count past 2**53 is not a real one (and
    # would lose precision, or overflow, in the float cost arithmetic).
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53


def usage_from_body(parsed: Any) -> Usage | None:
    """`usage` of a parsed answer or stream chunk, when it carries one (any JSON is safe here)."""
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return counted_usage(usage, "prompt_tokens", "completion_tokens")


class Accountant:
    """Turns usage into token and dollar counters."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._metrics = metrics
        self._prices = {
            m.name: (m.price.input_per_mtok / 1e6, m.price.output_per_mtok / 1e6) for m in config.models
        }
        teacher = config.teacher.price
        self._teacher_price = (teacher.input_per_mtok / 1e6, teacher.output_per_mtok / 1e6)
        # What a teacher-only deployment would have paid for a served answer: the teacher's
        # price, except for embeddings, which it would have bought from the same model.
        self._equivalent = {
            m.name: self._prices[m.name] if m.role == "embedding" else self._teacher_price
            for m in config.models
        }

    def cost(self, model: str, usage: Usage) -> float:
        """USD for this usage at the model's prices."""
        pin, pout = self._prices[model]
        return usage.prompt_tokens * pin + usage.completion_tokens * pout

    def teacher_cost(self, usage: Usage) -> float:
        """USD for this usage at the teacher's prices."""
        pin, pout = self._teacher_price
        return usage.prompt_tokens * pin + usage.completion_tokens * pout

    def record(self, model: str, usage: Usage, served: bool) -> tuple[float, float]:
        """Count one attempt's tokens and cost; `served` when its answer went to the client.

        Returns the attempt's cost in USD, and what a teacher-only deployment would have
        paid for it (0 for an answer that was not served).
        """
        m = self._metrics
        est = "true" if usage.estimated else "false"
        if usage.estimated:
            m.usage_missing.labels(model).inc()
        m.prompt_tokens.labels(model, est).inc(usage.prompt_tokens)
        m.completion_tokens.labels(model, est).inc(usage.completion_tokens)
        cost = self.cost(model, usage)
        m.cost.labels(model).inc(cost)
        if not served:
            return cost, 0.0
        pin, pout = self._equivalent[model]
        equivalent = usage.prompt_tokens * pin + usage.completion_tokens * pout
        m.teacher_cost.labels(model).inc(equivalent)
        return cost, equivalent
