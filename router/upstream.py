"""Upstream model servers: one pooled HTTP client per model, round-robin over its endpoints.

Each endpoint has a circuit breaker (`router/breaker.py`); round-robin skips
endpoints whose breaker is open, and a model whose endpoints are all open
fails fast so the request can move on to the teacher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from router.breaker import Breaker, State
from router.config import ModelConfig, resolve_api_key
from router.errors import UpstreamStatus, UpstreamUnavailable, map_upstream_errors

__all__ = ["Endpoint", "ModelPool", "SSEStream", "UpstreamReply"]

# Response headers worth passing to the client; hop-by-hop and framing headers
# are the gateway's own business.
# No legitimate chunk of a completion stream comes near this.
MAX_EVENT_BYTES = 4 * 1024 * 1024

PASS_HEADERS = ("retry-after", "openai-processing-ms", "x-ratelimit-remaining-requests")


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


class SSEStream:
    """A streaming upstream response split into whole server-sent events.

    Events are yielded as raw bytes including the blank-line terminator, so the
    client receives exactly what the upstream sent.
    """

    def __init__(self, response: aiohttp.ClientResponse, model: str) -> None:
        self.response = response
        self.model = model
        self._content = response.content
        self._buffer = b""
        self.done = False  # saw `data: [DONE]`

    async def next_event(self) -> bytes | None:
        """The next complete event, or None at the end of the body."""
        while True:
            cut = self._find_boundary()
            if cut >= 0:
                event, self._buffer = self._buffer[:cut], self._buffer[cut:].lstrip(b"\r\n")
                if event.startswith((b"data: [DONE]", b"data:[DONE]")):
                    self.done = True
                return event + b"\n\n"
            with map_upstream_errors(self.model):
                chunk = await self._content.readany()
                if not chunk:
                    tail, self._buffer = self._buffer.strip(), b""
                    if tail:
                        if tail.startswith((b"data: [DONE]", b"data:[DONE]")):
                            self.done = True
                        return tail + b"\n\n"
                    return None
            self._buffer += chunk
            if len(self._buffer) > MAX_EVENT_BYTES:
                # A stream that never ends an event would otherwise grow without bound.
                raise UpstreamUnavailable(
                    f"model {self.model!r} sent a stream event over {MAX_EVENT_BYTES} bytes"
                )

    def buffered(self) -> bool:
        """Whether a whole event is already here (the next `next_event` will not wait)."""
        return self._find_boundary() >= 0

    def _find_boundary(self) -> int:
        buf = self._buffer
        i = buf.find(b"\n\n")
        j = buf.find(b"\r\n\r\n")
        if i < 0:
            return j
        if j < 0:
            return i
        return min(i, j)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (event := await self.next_event()) is not None:
            yield event

    async def aclose(self) -> None:
        """Release the connection back to the pool, or drop it when the body was not read to the end."""
        if self.done or self._content.at_eof():
            self.response.release()
        else:
            self.response.close()


class ModelPool:
    """The HTTP client and endpoints of one configured model."""

    def __init__(
        self, model: ModelConfig, open_s: float, failure_threshold: int,
        on_change: Callable[[int, State], None] | None = None,
    ) -> None:
        self.model = model
        self.name = model.name
        self.endpoints = [
            Endpoint(
                str(u).rstrip("/"),
                Breaker(failure_threshold, open_s,
                        None if on_change is None else _bind(on_change, i)),
            )
            for i, u in enumerate(model.endpoints)
        ]
        self._next = 0
        headers = {"content-type": "application/json"}
        key = resolve_api_key(model)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=model.connect_timeout_s, sock_read=model.read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client, created on first use inside the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(
                    limit=self.model.max_connections,
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

    async def post(self, idx: int, path: str, body: bytes, request_id: str) -> UpstreamReply:
        """POST and read the whole answer; raise a gateway error on transport or status failure."""
        url = self.endpoints[idx].base_url + path
        with map_upstream_errors(self.name):
            async with self.session.post(url, data=body, headers={"x-request-id": request_id}) as resp:
                content = await resp.read()
        if resp.status >= 400:
            raise UpstreamStatus(resp.status, content, resp.headers.get("retry-after"))
        return UpstreamReply(resp.status, content, _pass_headers(resp))

    async def open_stream(self, idx: int, path: str, body: bytes, request_id: str) -> SSEStream:
        """POST a streaming request and return its event stream once the status is 2xx."""
        url = self.endpoints[idx].base_url + path
        with map_upstream_errors(self.name):
            resp = await self.session.post(url, data=body, headers={"x-request-id": request_id})
        if resp.status >= 400:
            try:
                with map_upstream_errors(self.name):
                    content = await resp.read()
            finally:
                resp.release()
            raise UpstreamStatus(resp.status, content, resp.headers.get("retry-after"))
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            resp.close()
            raise UpstreamUnavailable(
                f"model {self.name!r} answered a stream with {ctype or 'no content type'}"
            )
        return SSEStream(resp, self.name)

    async def probe(self, timeout_s: float = 2.0) -> bool:
        """True when any endpoint answers HTTP at all (readiness: the server is up)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        for ep in self.endpoints:
            try:
                async with self.session.get(ep.base_url + "/models", timeout=timeout):
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
    return {h: v for h in PASS_HEADERS if (v := resp.headers.get(h)) is not None}
