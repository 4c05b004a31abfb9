"""The routing policy: from the requested `model`, an override header and a score to a model.

The scorer only scores (`classifiers/`); this module only decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from router.config import Config, ModelConfig
from router.controller import ShareController
from router.errors import ModelNotAllowed, ModelNotFound

__all__ = ["Decision", "Reason", "Router"]

Reason = Literal["classifier", "pinned", "override", "context", "fallback"]
REASONS: tuple[Reason, ...] = ("classifier", "pinned", "override", "context", "fallback")


def _clip(name: str) -> str:
    """A client-supplied name, shortened for an error message."""
    return name if len(name) <= 80 else name[:80] + "…"


@dataclass(frozen=True, slots=True)
class Decision:
    """Which model serves a request, why, and the complexity score when one was computed."""

    model: ModelConfig
    reason: Reason
    score: float | None


class Router:
    """Applies the configured policy; holds no per-request state."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._by_name = {m.name: m for m in config.models}
        self._students = config.students
        self._teacher = config.teacher
        self._chars_per_token = config.routing.chars_per_token
        listed = config.routing.pinnable_models
        self._pinnable: frozenset[str] | None = None if listed is None else frozenset(listed)
        self._pinnable_by_key = {k: frozenset(v) for k, v in config.auth.pinning.items()}
        self.controller = ShareController(
            config.routing, {m.name: m.max_score for m in self._students if m.max_score is not None}
        )

    def estimate_tokens(self, chars: int) -> int:
        """Prompt-size estimate from characters (no tokenizer on the hot path)."""
        return math.ceil(chars / self._chars_per_token)

    def needs_score(self, requested: str, override: str | None) -> bool:
        """Whether the decision depends on the classifier."""
        if override is not None and self.config.routing.allow_override_header:
            return False
        return requested == self.config.routing.alias

    def _check_pin(self, model: ModelConfig, key_name: str | None, param: str) -> None:
        allowed = self._pinnable_by_key.get(key_name, self._pinnable) if key_name else self._pinnable
        if allowed is not None and model.name not in allowed:
            raise ModelNotAllowed(
                f"This API key may not choose the model `{model.name}`; "
                f"send `{self.config.routing.alias}` and let the gateway route.",
                param=param,
            )

    def decide(
        self,
        requested: str,
        override: str | None,
        score: float | None,
        needed_tokens: int,
        key_name: str | None = None,
    ) -> Decision:
        """Pick the model for one request.

        `needed_tokens` is the estimated prompt size plus the completion budget the
        client asked for; a student whose `context_window` is smaller is skipped.
        Naming a model directly (pin or override header) is subject to
        `routing.pinnable_models` and the caller's `auth.pinning` entry.
        """
        if override is not None and self.config.routing.allow_override_header:
            model = self._by_name.get(override)
            if model is None:
                raise ModelNotFound(
                    f"The model `{_clip(override)}` named by the x-triage-route header does not exist.",
                    param="x-triage-route",
                )
            self._check_pin(model, key_name, "x-triage-route")
            return Decision(model, "override", score)
        if requested != self.config.routing.alias:
            model = self._by_name.get(requested)
            if model is None:
                raise ModelNotFound(
                    f"The model `{_clip(requested)}` does not exist. Use `{self.config.routing.alias}` "
                    "or one of the models listed at /v1/models.",
                    param="model",
                )
            self._check_pin(model, key_name, "model")
            return Decision(model, "pinned", score)
        assert score is not None, "auto routing needs a score"
        skipped = False
        threshold = self.controller.threshold
        for student in self._students:
            if score >= threshold(student.name):
                continue
            window = student.context_window
            if window is not None and needed_tokens > window:
                skipped = True
                continue
            return Decision(student, "context" if skipped else "classifier", score)
        return Decision(self._teacher, "context" if skipped else "classifier", score)
