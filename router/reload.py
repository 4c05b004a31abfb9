"""Config reload: build a new gateway from the file, swap it in, retire the old one gracefully.

A request holds the gateway it started with for its whole life, so swapping
`app.state.gateway` drops nothing. The old gateway closes its upstream clients
once its last request finishes (or after `drain_s`). An invalid file is
rejected and the running gateway keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from classifiers import Scorer, load_scorer
from router.config import Config, ConfigError, load_config
from router.gateway import Gateway
from router.metrics import Metrics
from router.routing import REASONS

__all__ = ["ReloadError", "Reloader"]

log = logging.getLogger("triage.reload")


class ReloadError(Exception):
    """The new config could not be used; the message lists why."""


class Reloader:
    """Owns the swap of an app's gateway."""

    def __init__(
        self, app: Starlette, config_path: Path | None, metrics: Metrics, drain_s: float = 120.0
    ) -> None:
        self.app = app
        self.config_path = config_path
        self.metrics = metrics
        self.drain_s = drain_s
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self) -> Config:
        """Load, validate and swap in the config file; raise ReloadError and keep the old one."""
        if self.config_path is None:
            raise ReloadError("this gateway was not started from a config file")
        async with self._lock:
            try:
                config = load_config(self.config_path)
                old: Gateway = self.app.state.gateway
                scorer: Scorer = (
                    old.scorer if config.classifier == old.config.classifier
                    else load_scorer(config.classifier.kind, config.classifier.path)
                )
            except (ConfigError, OSError, ValueError) as exc:
                self.metrics.reloads.labels("rejected").inc()
                raise ReloadError(str(exc)) from None
            self.metrics.precreate([m.name for m in config.models], REASONS)
            new = Gateway(config, scorer, self.metrics)
            self.app.state.gateway = new
            self.metrics.reloads.labels("applied").inc()
            self._track(self._retire(old))
            log.info("config reloaded from %s", self.config_path)
            return config

    def reload_in_background(self) -> None:
        """Reload without a caller to answer (SIGHUP); a rejected file is logged."""

        async def run() -> None:
            try:
                await self.reload()
            except ReloadError as exc:
                log.error("config reload rejected, still serving the old config:\n%s", exc)

        self._track(run())

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        # Strong references until done: the event loop keeps only weak ones to tasks.
        task = asyncio.get_running_loop().create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Gateway) -> None:
        waited = 0.0
        while old.active > 0 and waited < self.drain_s:
            await asyncio.sleep(0.05)
            waited += 0.05
        await old.aclose()

    async def aclose(self) -> None:
        """Finish retiring old gateways (at shutdown)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
