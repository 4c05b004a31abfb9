"""The routing policy seam: what a policy is told about a request, and the policies by name.

A policy turns a `RequestContext` into a `Decision`. It owns whatever feedback it
learns from (the threshold policy's share controller), so the HTTP layer only asks
and never steers. Policies are picked by `routing.policy`, like scorers by
`classifier.kind` (`classifiers/registry.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from router.config import ApiName, Config, ModelConfig
from router.routing import Decision, RequestContext, ThresholdPolicy
from router.state import SharedState

__all__ = ["POLICIES", "RequestContext", "RoutingPolicy", "load_policy"]


class RoutingPolicy(Protocol):
    """Chooses the model for each request; see `ThresholdPolicy` for the built-in one."""

    def needs_score(self, requested: str, override: str | None, api: ApiName) -> bool:
        """Whether `decide` needs the complexity score for this request."""
        ...

    def decide(self, ctx: RequestContext) -> Decision:
        """The model that serves the request, and why (raise a GatewayError to refuse it)."""
        ...

    def estimate_tokens(self, chars: int, images: int = 0) -> int:
        """Prompt-size estimate from characters and image count."""
        ...

    def thresholds(self) -> dict[str, float]:
        """Each student's effective score threshold now (for metrics and `triage route`)."""
        ...

    @property
    def observed_share(self) -> float:
        """The share of scored requests recently sent to students."""
        ...

    @property
    def factor(self) -> float:
        """The factor every student threshold is scaled by now (1 when nothing steers them)."""
        ...

    def serves(self, model: ModelConfig, api: ApiName) -> bool:
        """Whether the model can answer this wire format (natively or through chat)."""
        ...

    def share_state(self, state: SharedState) -> None:
        """Learn from every replica's traffic through the shared state (`state:`), not this process's."""
        ...


POLICIES: dict[str, Callable[[Config, Callable[[], None]], RoutingPolicy]] = {
    "threshold": ThresholdPolicy,
}


def load_policy(config: Config, on_change: Callable[[], None]) -> RoutingPolicy:
    """The configured policy; `on_change` is called when its thresholds move."""
    return POLICIES[config.routing.policy](config, on_change)
