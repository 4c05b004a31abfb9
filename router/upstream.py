"""Upstream model servers: one pooled HTTP client per model, round-robin over its endpoints.

Each endpoint has a circuit breaker (`router/breaker.py`); round-robin skips
endpoints whose breaker is open, and a model whose endpoints are all open
fails fast so the request can move on to the teacher.

A model's requests take one of its `max_connections` slots before they are sent
and keep it until their answer is read (a stream: until it is closed). Waiting
for a slot is the gateway's own queue, not an upstream failure: it is measured
(`triage_upstream_pool_connections{state="waiting"}`), it never counts against
a breaker, and after `pool_timeout_s` it ends in 503 `overloaded`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from router.breaker import Breaker, State
from router.config import ModelConfig, resolve_api_key
from router.endpoints import FORMATS
from router.errors import (
    Overloaded,
    UpstreamRedirect,
    UpstreamStatus,
    UpstreamTooLarge,
    UpstreamUnavailable,
    map_upstream_errors,
    safe_header_value,
)
from router.metrics import POOL_STATES, Level, Metrics
from router.sse import SSEStream

__all__ = ["Endpoint", "ModelPool", "SSEStream", "UpstreamReply"]

# Response headers worth passing to the client; hop-by-hop and framing headers
# are the gateway's own business.
PASS_HEADERS = ("retry-after", "openai-processing-ms", "x-ratelimit-remaining-requests")
# Connections beyond the slots, for readiness probes, which take no slot.
_PROBE_CONNECTIONS = 2


@dataclass(slots=True)
class Endpoint:
    """One base URL of a model, with its circuit breaker."""

    base_url: str
    breaker: Breaker


@dataclass(slots=True)
class UpstreamReply:
    """A complete non-streaming answer."""

    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Slots:
    """At most `size` holders at once; the others wait in arrival order.

    A released slot passes straight to the first live waiter. A waiter that is
    cancelled or times out just as it is handed a slot keeps it (timeout) or
    passes it on (cancellation), so no slot is ever lost.
    """

    def __init__(self, size: int, in_use: Level | None, waiting: Level | None) -> None:
        self.size = size
        self.in_use = 0
        self.waiting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_use_level = in_use
        self._waiting_level = waiting

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one; False otherwise."""
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()  # cancelled waiters whose tasks have not run yet
        if self.in_use < self.size and not waiters:
            self._count(1, 0)
            return True
        return False

    async def acquire(self, timeout_s: float | None) -> bool:
        """Take a slot; wait up to `timeout_s` (None: not at all). False when none came free."""
        if self.try_acquire():
            return True
        if timeout_s is None:
            return False
        waiters = self._waiters
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        self._count(0, 1)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            return fut.done() and not fut.cancelled()  # handed a slot as time ran out: keep it
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()
            raise
        finally:
            self._count(0, -1)
            if not fut.done():
                fut.cancel()
            try:
                waiters.remove(fut)
            except ValueError:
                pass
        return True

    def release(self) -> None:
        """Give a slot back: to the first live waiter, or to the free count."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._count(-1, 0)

    def _count(self, in_use: int, waiting: int) -> None:
        # Increments, not absolute values: after a reload the old and the new
        # gateway's pools share the levels until the old one drains.
        if in_use:
            self.in_use += in_use
            if self._in_use_level is not None:
                self._in_use_level.value += in_use
        if waiting:
            self.waiting += waiting
            if self._waiting_level is not None:
                self._waiting_level.value += waiting


class _Lease:
    """One held slot; `release` may be called any number of times."""

    __slots__ = ("_slots",)

    def __init__(self, slots: _Slots) -> None:
        self._slots: _Slots | None = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


class ModelPool:
    """The HTTP client and endpoints of one configured model."""

    def __init__(
        self,
        model: ModelConfig,
        open_s: float,
        failure_threshold: int,
        on_change: Callable[[int, State], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.name = model.name
        self.endpoints = [
            Endpoint(
                str(u).rstrip("/"),
                Breaker(failure_threshold, open_s, None if on_change is None else _bind(on_change, i)),
            )
            for i, u in enumerate(model.endpoints)
        ]
        self._next = 0
        headers = {"content-type": "application/json"}
        key = resolve_api_key(model)
        if key:
            headers["authorization"] = f"Bearer {key}"
        for api in sorted(model.apis):
            headers.update(FORMATS[api].upstream_headers(key))
        self._headers = headers
        # `connect` would also cover the wait for a pooled connection, and a request
        # queued behind busy ones would be reported as a timed-out upstream: only the
        # TCP connect and each read are timed (a DNS lookup, by the request deadline).
        # The queue is `_slots`, with its own limit and its own error.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=model.connect_timeout_s,
            sock_read=model.read_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None
        levels = (
            (None, None)
            if metrics is None
            else tuple(metrics.level(metrics.pool_connections.labels(model.name, s)) for s in POOL_STATES)
        )
        self._slots = _Slots(model.max_connections, *levels)
        self._pool_timeouts = None if metrics is None else metrics.pool_timeouts.labels(model.name)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client, created on first use inside the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(
                    # Every request holds a slot first, so the slots are the only queue.
                    limit=self.model.max_connections + _PROBE_CONNECTIONS,
                    keepalive_timeout=self.model.keepalive_timeout_s,
                ),
                # Never read proxy settings or netrc from the environment: upstream
                # traffic goes exactly where config says.
                trust_env=False,
                # Bodies are forwarded as received; Triage never needs a cookie jar.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def pick(self, tried: set[int]) -> int | None:
        """Claim the next endpoint to try, or None when every untried one is open."""
        n = len(self.endpoints)
        for step in range(n):
            idx = (self._next + step) % n
            if idx not in tried and self.endpoints[idx].breaker.acquire():
                self._next = idx + 1
                return idx
        return None

    def mark_ok(self, idx: int) -> None:
        """The endpoint answered (even with a client error): it is healthy."""
        self.endpoints[idx].breaker.success()

    def mark_failed(self, idx: int, retry_after_s: float | None = None) -> None:
        """Count a failure against the endpoint's breaker."""
        self.endpoints[idx].breaker.failure(retry_after_s)

    def release(self, idx: int) -> None:
        """Give back a claim that ended without a verdict."""
        self.endpoints[idx].breaker.release()

    @property
    def in_use(self) -> int:
        """Requests holding a connection slot now."""
        return self._slots.in_use

    @property
    def waiting(self) -> int:
        """Requests queued for a connection slot now."""
        return self._slots.waiting

    def _free_lease(self) -> _Lease | None:
        """A free slot's lease, taken at once (no coroutine), or None: then `_lease` waits."""
        return _Lease(self._slots) if self._slots.try_acquire() else None

    async def _lease(self, wait: bool) -> _Lease:
        timeout_s = self.model.pool_timeout_s
        if not await self._slots.acquire(timeout_s if wait else None):
            if wait and self._pool_timeouts is not None:
                self._pool_timeouts.inc()
            raise Overloaded(
                f"model {self.name!r} has no free connection"
                + (f" after {timeout_s:g} s" if wait else "")
                + "; retry shortly.",
                retry_after_s=1.0,
            )
        return _Lease(self._slots)

    async def post(
        self, idx: int, path: str, body: bytes, request_id: str, *, wait: bool = True
    ) -> UpstreamReply:
        """POST and read the whole answer; raise a gateway error on transport or status failure.

        Raises Overloaded (not an upstream error) when no connection slot comes free
        within `pool_timeout_s`, or at once when `wait` is False and none is free.
        """
        lease = self._free_lease() or await self._lease(wait)
        try:
            url = self.endpoints[idx].base_url + path
            with map_upstream_errors(self.name):
                async with self.session.post(
                    url, data=body, headers={"x-request-id": request_id}, allow_redirects=False
                ) as resp:
                    self._check_status(resp)
                    content = await self._read_body(resp)
        finally:
            lease.release()
        if resp.status >= 400:
            raise UpstreamStatus(resp.status, content, resp.headers.get("retry-after"))
        return UpstreamReply(resp.status, content, _pass_headers(resp))

    async def open_stream(self, idx: int, path: str, body: bytes, request_id: str) -> SSEStream:
        """POST a streaming request and return its event stream once the status is 2xx.

        The stream holds a connection slot until its `aclose`.
        """
        lease = self._free_lease() or await self._lease(True)
        try:
            url = self.endpoints[idx].base_url + path
            with map_upstream_errors(self.name):
                resp = await self.session.post(
                    url, data=body, headers={"x-request-id": request_id}, allow_redirects=False
                )
        except BaseException:
            lease.release()
            raise
        try:
            self._check_status(resp)
            if resp.status >= 400:
                with map_upstream_errors(self.name):
                    content = await self._read_body(resp)
                raise UpstreamStatus(resp.status, content, resp.headers.get("retry-after"))
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raise UpstreamUnavailable(
                    f"model {self.name!r} answered a stream with {ctype or 'no content type'}"
                )
        except BaseException:
            resp.release()  # keeps the connection only when its body was read to the end
            lease.release()
            raise
        return SSEStream(resp, self.name, self.model.max_response_bytes, lease.release)

    def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        """Refuse a redirect, and any final status outside 200-599.

        aiohttp hands over any three digits (099, 600, 999) and a final 101;
        passed on, such a status would kill the client's response in uvicorn.
        """
        if not 200 <= resp.status <= 599:
            raise UpstreamUnavailable(
                f"model {self.name!r} answered with an invalid status (HTTP {resp.status})"
            )
        if 300 <= resp.status < 400:
            raise UpstreamRedirect(
                f"model {self.name!r} answered with a redirect (HTTP {resp.status}), which is not followed"
            )

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, refused once it passes `max_response_bytes` after decompression.

        Compressed answers stay allowed (they save bandwidth on long ones), and stay
        bounded: aiohttp 3.14 inflates incrementally, at most about one buffer
        (64 KiB or the reader's low-water mark) per step, and takes more input only
        as the reader drains it. So counting while reading stops a gzip bomb at
        about the cap plus one chunk, where `resp.read()` would inflate all of it.
        """
        cap = self.model.max_response_bytes
        declared = resp.content_length
        if declared is not None:
            if declared > cap:
                raise self._too_large(cap)
            if "content-encoding" not in resp.headers:
                # Plain bytes of a declared length under the cap: one read, no loop.
                return await resp.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > cap:
                raise self._too_large(cap)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, cap: int) -> UpstreamTooLarge:
        return UpstreamTooLarge(f"model {self.name!r} sent an answer over {cap} bytes")

    async def probe(self, timeout_s: float = 2.0) -> bool:
        """True when any endpoint answers HTTP at all (readiness: the server is up)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        for ep in self.endpoints:
            try:
                async with self.session.get(ep.base_url + "/models", timeout=timeout, allow_redirects=False):
                    return True
            except (aiohttp.ClientError, TimeoutError):
                continue
        return False

    async def aclose(self) -> None:
        """Close the pooled client."""
        if self._session is not None:
            await self._session.close()


def _bind(on_change: Callable[[int, State], None], idx: int) -> Callable[[State], None]:
    return lambda state: on_change(idx, state)


def _pass_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    # A value that is not short printable ASCII is dropped, not repaired: it
    # carries nothing a client could use, and would break the response.
    return {h: v for h in PASS_HEADERS if (v := safe_header_value(resp.headers.get(h))) is not None}
