"""The gateway's shared state: config, scorer, router, upstream pools, metrics; built once at start."""

from __future__ import annotations

import math
import re

from classifiers import Scorer
from router.accounting import Accountant
from router.config import Config
from router.metrics import Metrics
from router.quality import compile_refusals
from router.routing import Router
from router.shadow import Shadow
from router.upstream import ModelPool

__all__ = ["Gateway"]


class Gateway:
    """Everything a request handler needs; one per running app."""

    def __init__(self, config: Config, scorer: Scorer, metrics: Metrics) -> None:
        self.config = config
        self.scorer = scorer
        self.metrics = metrics
        self.router = Router(config)
        self.accountant = Accountant(config, metrics)
        self.pools = {
            m.name: ModelPool(m, config.routing.endpoint_cooldown_s) for m in config.models
        }
        self.teacher = config.teacher
        self.refusals: dict[str, re.Pattern[str]] = {
            m.name: compile_refusals(m.checks) for m in config.students
        }
        self.shadow = Shadow(
            config.routing.shadow_rate, config.routing.shadow_max_concurrency,
            self.pools[self.teacher.name], metrics, self.accountant,
        )
        target = config.routing.target_student_share
        metrics.student_share_target.set(target if target is not None else math.nan)
        self.publish_thresholds()

    def publish_thresholds(self) -> None:
        """Export the share controller's current thresholds and observed share."""
        controller = self.router.controller
        for name, value in controller.thresholds().items():
            self.metrics.score_threshold.labels(name).set(value)
        self.metrics.student_share.set(controller.observed_share)

    async def aclose(self) -> None:
        """Stop shadow work and close every upstream client."""
        await self.shadow.drain()
        for pool in self.pools.values():
            await pool.aclose()
