"""Routing's vocabulary (reasons, the request context, the decision) and the threshold policy.

The scorer only scores (`classifiers/`); a policy only decides. The seam a policy plugs
into, and the registry, are in `router/policy.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from router.config import ApiName, Capability, Config, ModelConfig
from router.controller import ShareController
from router.endpoints import FORMATS
from router.errors import InvalidRequest, ModelNotAllowed, ModelNotFound
from router.share_window import ShareWindow
from router.state import SharedState

__all__ = ["REASONS", "Decision", "Reason", "RequestContext", "ThresholdPolicy"]

Reason = Literal["classifier", "pinned", "override", "context", "capability", "unscored", "fallback"]
REASONS: tuple[Reason, ...] = (
    "classifier",
    "pinned",
    "override",
    "context",
    "capability",
    "unscored",
    "fallback",
)


def _clip(name: str) -> str:
    """A client-supplied name, shortened for an error message."""
    return name if len(name) <= 80 else name[:80] + "…"


@dataclass(frozen=True, slots=True)
class Decision:
    """Which model serves a request, why, and the complexity score when one was computed."""

    model: ModelConfig
    reason: Reason
    score: float | None
    # When the score sent the request to the teacher: the student next in line (the
    # highest-threshold student able to take it), which exploration may ask.
    next_student: ModelConfig | None = None


@dataclass(slots=True)
class RequestContext:
    """Everything a policy may use to choose a model for one request."""

    api: ApiName  # the wire format the client spoke
    requested: str  # the request's `model`
    override: str | None  # the x-triage-route header
    score: float | None  # the complexity score, when the policy asked for one
    needed_tokens: int  # estimated prompt tokens plus the completion budget
    needs: frozenset[Capability]  # what the request needs of a model (images, tools, a schema)
    key_name: str | None  # the caller's API key name


class ThresholdPolicy:
    """The built-in policy: the first student below its score threshold that can take the request.

    A student is skipped when the request's estimated size exceeds its `context_window`
    (reason `context`), or when the request needs what it cannot do: images, tools, a JSON
    schema, or a wire format it neither speaks nor can be translated to (reason
    `capability`). Holds no per-request state; the share controller learns from every
    scored decision.
    """

    def __init__(self, config: Config, on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self._by_name = {m.name: m for m in config.models}
        self._students = config.students
        self._teacher = config.teacher
        self._unscored = [m for m in config.models if m.role == "embedding"] + [
            m for m in config.models if m.role != "embedding"
        ]
        self._chars_per_token = config.routing.chars_per_token
        self._image_tokens = config.routing.image_tokens
        listed = config.routing.pinnable_models
        self._pinnable: frozenset[str] | None = None if listed is None else frozenset(listed)
        self._pinnable_by_key = {k: frozenset(v) for k, v in config.auth.pinning.items()}
        self.controller = ShareController(
            config.routing, {m.name: m.max_score for m in self._students if m.max_score is not None}
        )
        self._on_change = on_change

    def estimate_tokens(self, chars: int, images: int = 0) -> int:
        """Prompt-size estimate from characters and images (no tokenizer on the hot path)."""
        return math.ceil(chars / self._chars_per_token) + images * self._image_tokens

    def needs_score(self, requested: str, override: str | None, api: ApiName = "chat") -> bool:
        """Whether the decision depends on the classifier."""
        if not FORMATS[api].scored:
            return False
        if override is not None and self.config.routing.allow_override_header:
            return False
        return requested == self.config.routing.alias

    def thresholds(self) -> dict[str, float]:
        """Each student's effective max_score now."""
        return self.controller.thresholds()

    @property
    def observed_share(self) -> float:
        """The share of scored requests recently sent to students."""
        return self.controller.observed_share

    @property
    def factor(self) -> float:
        """The share controller's factor on every student threshold."""
        return self.controller.factor

    def share_state(self, state: SharedState) -> None:
        """Keep the share controller's window and factor in Redis, one for every replica."""
        if self.controller.enabled and state.config.share_controller:
            window = ShareWindow(state, self.config.routing, self.controller.top)
            self.controller.share(window, self._on_change)

    @staticmethod
    def serves(model: ModelConfig, api: ApiName) -> bool:
        """Whether the model answers this wire format, natively or translated to chat."""
        apis = model.apis
        return api in apis or (FORMATS[api].via_chat is not None and "chat" in apis)

    def _check_pin(self, model: ModelConfig, key_name: str | None, param: str) -> None:
        allowed = self._pinnable_by_key.get(key_name, self._pinnable) if key_name else self._pinnable
        if allowed is not None and model.name not in allowed:
            raise ModelNotAllowed(
                f"This API key may not choose the model `{model.name}`; "
                f"send `{self.config.routing.alias}` and let the gateway route.",
                param=param,
            )

    def _named(self, name: str, ctx: RequestContext, param: str, header: bool) -> ModelConfig:
        model = self._by_name.get(name)
        if model is None:
            where = "named by the x-triage-route header " if header else ""
            hint = (
                ""
                if header
                else (f" Use `{self.config.routing.alias}` or one of the models listed at /v1/models.")
            )
            raise ModelNotFound(f"The model `{_clip(name)}` {where}does not exist.{hint}", param=param)
        self._check_pin(model, ctx.key_name, param)
        if not self.serves(model, ctx.api):
            raise InvalidRequest(f"The model `{model.name}` does not serve the {ctx.api} API.", param=param)
        return model

    def decide(self, ctx: RequestContext) -> Decision:
        """Pick the model for one request.

        Naming a model directly (pin or override header) is subject to
        `routing.pinnable_models` and the caller's `auth.pinning` entry, and skips the
        capability checks: the client chose.
        """
        if ctx.override is not None and self.config.routing.allow_override_header:
            return Decision(self._named(ctx.override, ctx, "x-triage-route", True), "override", ctx.score)
        if ctx.requested != self.config.routing.alias:
            return Decision(self._named(ctx.requested, ctx, "model", False), "pinned", ctx.score)
        if not FORMATS[ctx.api].scored:
            for model in self._unscored:
                if self.serves(model, ctx.api):
                    return Decision(model, "unscored", None)
            raise ModelNotFound(f"No configured model serves {ctx.api}.", param="model")
        score = ctx.score
        assert score is not None, "auto routing needs a score"
        decision = self._by_score(ctx, score)
        if self.controller.observe(score, decision.model.role == "student") and self._on_change is not None:
            self._on_change()
        return decision

    def _by_score(self, ctx: RequestContext, score: float) -> Decision:
        skipped: Reason | None = None
        threshold = self.controller.threshold
        for student in self._students:
            if score >= threshold(student.name):
                continue
            if ctx.needs and not _can(student, ctx.needs) or not self.serves(student, ctx.api):
                skipped = "capability"
                continue
            window = student.context_window
            if window is not None and ctx.needed_tokens > window:
                skipped = skipped or "context"
                continue
            return Decision(student, skipped or "classifier", score)
        return Decision(self._teacher, skipped or "classifier", score, self._next_in_line(ctx))

    def _next_in_line(self, ctx: RequestContext) -> ModelConfig | None:
        threshold = self.controller.threshold
        able = [
            s
            for s in self._students
            if (not ctx.needs or _can(s, ctx.needs))
            and self.serves(s, ctx.api)
            and (s.context_window is None or ctx.needed_tokens <= s.context_window)
        ]
        return max(able, key=lambda s: threshold(s.name), default=None)


def _can(model: ModelConfig, needs: frozenset[Capability]) -> bool:
    caps = model.capabilities
    return all(getattr(caps, need) for need in needs)
