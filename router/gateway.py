"""The gateway's shared state: config, scorer, policy, upstream pools, metrics; built once at start."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable

from classifiers import Scorer
from router.accounting import Accountant
from router.auth import Authenticator
from router.breaker import State
from router.config import Config
from router.errors import Overloaded
from router.limits import SharedLimits
from router.logs import UPSTREAM, event
from router.metrics import Level, Metrics
from router.policy import RoutingPolicy, load_policy
from router.quality import compile_refusals
from router.records import Recorder
from router.retry_budget import RetryBudget
from router.shadow import Shadow
from router.state import SharedState
from router.upstream import ModelPool

__all__ = ["Gateway"]

_STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


class Gateway:
    """Everything a request handler needs; one per running app."""

    def __init__(
        self, config: Config, scorer: Scorer, metrics: Metrics, recorder: Recorder | None = None
    ) -> None:
        self.config = config
        # Kept across reloads (the app passes the same one), like the metrics.
        self.recorder = recorder if recorder is not None else Recorder()
        # Completion requests in progress in this process. A reload builds a new Gateway
        # on the same Metrics, hence the same level, so the limit
        # (`server.max_inflight_requests`) counts every request still running.
        self.admission: Level = metrics.level(metrics.admitted)
        self._max_inflight = config.server.max_inflight_requests
        self.scorer = scorer
        self.metrics = metrics
        self.accountant = Accountant(config, metrics)
        routing = config.routing
        self.pools = {
            m.name: ModelPool(
                m,
                routing.endpoint_cooldown_s,
                routing.breaker_failures,
                self._circuit_callback(m.name),
                metrics=metrics,
            )
            for m in config.models
        }
        for m in config.models:
            for i in range(len(m.endpoints)):
                metrics.circuit_state.labels(m.name, str(i)).set(0)
        for m in config.students:  # so dashboards show shadow agreement as empty, not missing
            metrics.shadow_agreement.labels(m.name)
        self.retry_budget = RetryBudget(routing.retry_budget_ratio, routing.retry_budget_burst)
        # Shared state (`state:`): limits, spend and the share controller in Redis.
        self.state = SharedState(config.state, metrics) if config.state is not None else None
        if self.state is None:
            metrics.state_up.set(math.nan)  # no shared state: nothing to be up or down
        self.limits: SharedLimits | None = None
        limits = config.auth.limits
        if self.state is not None and (
            limits.requests_per_minute or limits.tokens_per_minute or limits.budget_usd
        ):
            self.limits = SharedLimits(self.state, limits, metrics)
        self.auth = Authenticator(config.auth, shared=self.limits)
        kinds = ["requests_per_minute", "tokens_per_minute", "budget_exceeded"]
        if self.limits is not None:
            kinds.append("shared_state_unavailable")
        for name in self.auth.names:
            metrics.key_cost.labels(name)
            for limit in kinds:
                metrics.rate_limited.labels(name, limit)
        # Requests in flight on this gateway; a reload closes the old one when it reaches 0.
        self.active = 0
        self.teacher = config.teacher
        self.refusals: dict[str, re.Pattern[str]] = {
            m.name: compile_refusals(m.checks) for m in config.students
        }
        self.shadow = Shadow(
            config.routing.shadow_rate,
            config.routing.shadow_max_concurrency,
            self.pools[self.teacher.name],
            metrics,
            self.accountant,
            self.recorder,
            explore_rate=config.routing.explore_rate,
            student_pools={m.name: self.pools[m.name] for m in config.students},
        )
        target = config.routing.target_student_share
        metrics.student_share_target.set(target if target is not None else math.nan)
        self.policy: RoutingPolicy = load_policy(config, self.publish_thresholds)
        self._starting: asyncio.Task[None] | None = None
        if self.state is not None:
            self.policy.share_state(self.state)
            # Built inside the running app (lifespan or reload), so the loop is there.
            self._starting = asyncio.get_running_loop().create_task(self.state.start())
        self.publish_thresholds()

    def enter(self) -> None:
        """Hold this gateway for one request (a reload retires it only when none holds it)."""
        self.active += 1

    def admit(self) -> None:
        """Count one request against `server.max_inflight_requests`, or raise Overloaded.

        Called once the body has arrived, so a client trickling its body in holds a
        connection (bounded by `server.body_timeout_s`) but no admission slot.
        """
        if self.admission.value >= self._max_inflight:
            raise Overloaded(
                f"The gateway is at its limit of {self._max_inflight} requests in flight; retry shortly.",
                retry_after_s=1.0,
            )
        self.admission.value += 1

    def leave(self, admitted: bool = True) -> None:
        """A request has finished (for a stream: its last event is sent)."""
        self.active -= 1
        if admitted:
            self.admission.value -= 1

    def _circuit_callback(self, model: str) -> Callable[[int, State], None]:
        def changed(idx: int, state: State) -> None:
            self.metrics.circuit_state.labels(model, str(idx)).set(_STATE_VALUE[state])
            self.metrics.circuit_transitions.labels(model, str(idx), state).inc()
            event(
                UPSTREAM,
                logging.INFO if state == "closed" else logging.WARNING,
                "circuit breaker",
                model=model,
                endpoint=idx,
                state=state,
            )

        return changed

    def publish_thresholds(self) -> None:
        """Export the share controller's current thresholds and observed share."""
        for name, value in self.policy.thresholds().items():
            self.metrics.score_threshold.labels(name).set(value)
        self.metrics.student_share.set(self.policy.observed_share)

    async def aclose(self) -> None:
        """Stop shadow work and close every upstream client."""
        await self.shadow.drain()
        if self.limits is not None:
            await self.limits.aclose()  # spend still queued goes to Redis before the process ends
        if self._starting is not None:
            await self._starting
        if self.state is not None:
            await self.state.aclose()
        for pool in self.pools.values():
            await pool.aclose()
