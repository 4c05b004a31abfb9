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
from router.config import ClassifierConfig, Config, ConfigError, load_config
from router.gateway import Gateway
from router.logs import event
from router.metrics import Metrics
from router.routing import REASONS

__all__ = ["ReloadError", "Reloader"]

log = logging.getLogger("triage.reload")


def _describe(exc: BaseException) -> str:
    """An exception as a one-line reason, without a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _file_stamp(classifier: ClassifierConfig) -> tuple[int, int] | None:
    """When and how big the classifier's file is, so a rewritten file is loaded again."""
    if classifier.path is None:
        return None
    try:
        st = classifier.path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


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
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        self._stamp = None if gateway is None else _file_stamp(gateway.config.classifier)

    async def reload(self) -> Config:
        """Load, validate and swap in the config file; raise ReloadError and keep the old one."""
        if self.config_path is None:
            raise ReloadError("this gateway was not started from a config file")
        async with self._lock:
            old: Gateway = self.app.state.gateway
            try:
                config = load_config(self.config_path)
                # A new path, or a model file rewritten in place (`triage learn`), loads again.
                stamp = _file_stamp(config.classifier)
                scorer: Scorer = (
                    old.scorer
                    if config.classifier == old.config.classifier and stamp == self._stamp
                    else load_scorer(config.classifier.kind, config.classifier.path)
                )
                # Building the gateway reads the keys file and compiles patterns: anything
                # wrong there rejects the file too, and the running gateway stays.
                new = Gateway(config, scorer, self.metrics, old.recorder)
            except ConfigError as exc:
                raise self._rejected(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - an unloadable classifier raises anything
                raise self._rejected(_describe(exc)) from None
            self.metrics.precreate([m.name for m in config.models], REASONS)
            self.app.state.gateway = new
            self._stamp = stamp
            self.metrics.reloads.labels("applied").inc()
            self._track(self._retire(old))
            event(
                log,
                logging.INFO,
                "config reloaded",
                path=str(self.config_path),
                models=",".join(m.name for m in config.models),
            )
            return config

    def _rejected(self, why: str) -> ReloadError:
        self.metrics.reloads.labels("rejected").inc()
        event(
            log,
            logging.ERROR,
            "config reload rejected, still serving the old config",
            path=str(self.config_path),
            error=why,
        )
        return ReloadError(why)

    def reload_in_background(self) -> None:
        """Reload without a caller to answer (SIGHUP); a rejected file is logged."""

        async def run() -> None:
            try:
                await self.reload()
            except ReloadError:
                pass  # already logged and counted

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
