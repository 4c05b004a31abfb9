"""The connection to the shared state (Redis): one pooled client per process, bounded calls, and
what happens while Redis is slow or down.

Every call waits at most `state.timeout_s` (connect, pool and answer together). A failed call
marks Redis down for `state.retry_s`: calls in that time fail at once without trying, so no
request queues behind a dead server, then the next call tries again and the pool reconnects
by itself. Going down and coming back are logged once each and shown in
`triage_shared_state_up`; each failed call is counted in `triage_shared_state_errors_total{op}`.
What a failure means for a request (`fail_open` or `fail_closed`) is decided by the caller.

Scripts are registered once and run with EVALSHA; after a Redis restart empties its script
cache, a script is loaded again on its first NOSCRIPT. The limits batch, once per request
turn, runs on connections of its own (`eval`): the EVALSHA written and its answer read
directly, which costs about two thirds of the CPU of a call through redis-py's command layer
(retries, pool checkout, instrumentation). Other calls go through that layer (`run`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from router.config import StateConfig
from router.logs import event
from router.metrics import Metrics

__all__ = ["SharedState", "Unavailable"]

log = logging.getLogger("triage.state")

# The operations counted apart in triage_shared_state_errors_total.
OPS = ("start", "limits", "share")


class Unavailable(Exception):
    """Redis did not answer within the timeout, or is marked down after a recent failure."""


class SharedState:
    """The process's Redis client and its health; built by the gateway when `state:` is set."""

    def __init__(
        self, config: StateConfig, metrics: Metrics, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.prefix = config.key_prefix
        self.metrics = metrics
        # A blocking pool waits (up to the timeout) for a free connection instead of failing
        # when every one is busy. One immediate retry on a fresh connection: after Redis
        # restarts, each pooled connection fails once on first use. The timeout bounds both.
        pool = aioredis.BlockingConnectionPool.from_url(
            env[config.redis_url_env],
            max_connections=config.max_connections,
            timeout=config.timeout_s,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
            client_name="triage",
        )
        self._pool = pool
        self.client = aioredis.Redis(connection_pool=pool)
        # `eval`'s connections: idle ones, and how many exist (at most max_connections).
        self._idle: list[AbstractConnection] = []
        self._own = 0
        self._scripts: list[AsyncScript] = []
        self._down_until = 0.0
        self._down = False
        metrics.state_up.set(1)
        for op in OPS:
            metrics.state_errors.labels(op)
        for outcome in ("served", "refused"):
            metrics.state_unchecked.labels(outcome)

    def key(self, *parts: str) -> str:
        """A Redis key under the configured prefix."""
        return self.prefix + ":".join(parts)

    def script(self, lua: str) -> AsyncScript:
        """A Lua script run by its SHA (no round trip to register it; `start` loads it)."""
        script = self.client.register_script(lua)
        self._scripts.append(script)
        return script

    async def start(self) -> None:
        """Connect and load every script once, so the first requests do not pay for it, and log
        whether Redis answers (a wrong address or password shows at start, not at the first key)."""
        try:
            async with asyncio.timeout(self.config.timeout_s * (1 + len(self._scripts))):
                for script in self._scripts:
                    await self.client.script_load(script.script)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("start", exc)
            return
        event(
            log,
            logging.INFO,
            "shared state ready",
            key_prefix=self.prefix,
            on_failure=self.config.on_failure,
            scripts=len(self._scripts),
        )

    def retry_in_s(self) -> float:
        """Seconds until a call will try Redis again (0 when it would now)."""
        return max(0.0, self._down_until - time.monotonic())

    def try_now(self) -> None:
        """Let the next call try Redis even if one failed moments ago."""
        self._down_until = 0.0

    @property
    def skipping(self) -> bool:
        """Whether calls are failing at once because Redis failed moments ago."""
        return self._down and time.monotonic() < self._down_until

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], op: str) -> Any:
        """The script's result, or Unavailable within `timeout_s`."""
        if self.skipping:
            raise Unavailable
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(op, exc)
            raise Unavailable from None
        if self._down:
            self._recovered(op)
        return result

    async def eval(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], op: str) -> Any:
        """`run` on a connection of its own, for the request path."""
        if self.skipping:
            raise Unavailable
        if self._idle:
            conn = self._idle.pop()
        elif self._own < self.config.max_connections:
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            self._own += 1
        else:
            return await self.run(script, keys, args, op)  # all busy: the pool waits for one
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await self._evalsha(conn, script, keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            await self._drop(conn)
            self._failed(op, exc)
            raise Unavailable from None
        except BaseException:
            await self._drop(conn)  # cancelled mid-command: its answer would be read by the next
            raise
        self._idle.append(conn)
        if self._down:
            self._recovered(op)
        return result

    async def _evalsha(
        self, conn: AbstractConnection, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        packed = conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)
        for attempt in (1, 2):
            try:
                if not conn.is_connected:
                    await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response()
            except NoScriptError:
                # A restarted Redis has an empty script cache.
                await conn.send_command("SCRIPT", "LOAD", script.script)
                await conn.read_response()
            except (RedisConnectionError, OSError):
                # After a Redis restart an idle connection fails once; the next one is fresh.
                await conn.disconnect(nowait=True)
                if attempt == 2:
                    raise
        await conn.send_packed_command(packed, check_health=False)
        return await conn.read_response()

    async def _drop(self, conn: AbstractConnection) -> None:
        self._own -= 1
        await conn.disconnect(nowait=True)

    def _recovered(self, op: str) -> None:
        self._down = False
        self.metrics.state_up.set(1)
        event(log, logging.INFO, "shared state reachable again", op=op)

    def _failed(self, op: str, exc: BaseException) -> None:
        self.metrics.state_errors.labels(op).inc()
        self._down_until = time.monotonic() + self.config.retry_s
        if not self._down:
            self._down = True
            self.metrics.state_up.set(0)
            # The exception's class only: its text may name the server's address.
            event(
                log,
                logging.WARNING,
                "shared state unavailable",
                op=op,
                error=type(exc).__name__,
                on_failure=self.config.on_failure,
                retry_s=self.config.retry_s,
            )

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self.client.aclose()
        await self._pool.disconnect()
        for conn in self._idle:
            await conn.disconnect()
        self._idle.clear()
