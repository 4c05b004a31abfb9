"""Upstream model servers: one pooled HTTP client per model, round-robin over its endpoints.

Each endpoint has a circuit breaker (`router/breaker.py`); round-robin skips
endpoints whose breaker is open, and a model whose endpoints are all open
fails fast so the request can move on to the teacher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx2 as httpx

from router.breaker import Breaker, State
from router.config import ModelConfig, resolve_api_key
from router.errors import UpstreamStatus, UpstreamUnavailable, map_upstream_errors

__all__ = ["Endpoint", "ModelPool", "SSEStream", "UpstreamReply"]

# Response headers worth passing to the client; hop-by-hop and framing headers
# are the gateway's own business.
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

    def __init__(self, response: httpx.Response, model: str) -> None:
        self.response = response
        self.model = model
        self._raw = response.aiter_raw()
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
                try:
                    chunk = await self._raw.__anext__()
                except StopAsyncIteration:
                    tail, self._buffer = self._buffer.strip(), b""
                    if tail:
                        if tail.startswith((b"data: [DONE]", b"data:[DONE]")):
                            self.done = True
                        return tail + b"\n\n"
                    return None
            self._buffer += chunk

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
        """Release the connection back to the pool (or drop it if unread)."""
        await self.response.aclose()


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
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(
                connect=model.connect_timeout_s,
                read=model.read_timeout_s,
                write=model.read_timeout_s,
                pool=model.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=model.max_connections,
                max_keepalive_connections=model.max_keepalive_connections,
            ),
            # Never read proxy settings or netrc from the environment: upstream
            # traffic goes exactly where config says.
            trust_env=False,
        )

    def pick(self, tried: set[int]) -> int | None:
        """Claim the next endpoint to try, or None when every untried one is open."""
        n = len(self.endpoints)
        for step in range(n):
            idx = (self._next + step) % n
            if idx not in tried and self.endpoints[idx].breaker.acquire():
                self._next = idx + 1
                return idx
        return None

    def available(self) -> bool:
        """Whether any endpoint would take a request now."""
        return any(ep.breaker.available() for ep in self.endpoints)

    def mark_ok(self, idx: int) -> None:
        """The endpoint answered (even with a client error): it is healthy."""
        self.endpoints[idx].breaker.success()

    def mark_failed(self, idx: int, retry_after_s: float | None = None) -> None:
        """Count a failure against the endpoint's breaker."""
        self.endpoints[idx].breaker.failure(retry_after_s)

    def release(self, idx: int) -> None:
        """Give back a claim that ended without a verdict."""
        self.endpoints[idx].breaker.release()

    def _request(self, idx: int, path: str, body: bytes, request_id: str) -> httpx.Request:
        return self.client.build_request(
            "POST", self.endpoints[idx].base_url + path, content=body,
            headers={"x-request-id": request_id},
        )

    async def post(self, idx: int, path: str, body: bytes, request_id: str) -> UpstreamReply:
        """POST and read the whole answer; raise a gateway error on transport or status failure."""
        with map_upstream_errors(self.name):
            resp = await self.client.send(self._request(idx, path, body, request_id))
        if resp.status_code >= 400:
            raise UpstreamStatus(resp.status_code, resp.content, resp.headers.get("retry-after"))
        return UpstreamReply(resp.status_code, resp.content, _pass_headers(resp))

    async def open_stream(self, idx: int, path: str, body: bytes, request_id: str) -> SSEStream:
        """POST a streaming request and return its event stream once the status is 2xx."""
        with map_upstream_errors(self.name):
            resp = await self.client.send(self._request(idx, path, body, request_id), stream=True)
        if resp.status_code >= 400:
            try:
                with map_upstream_errors(self.name):
                    content = await resp.aread()
            finally:
                await resp.aclose()
            raise UpstreamStatus(resp.status_code, content, resp.headers.get("retry-after"))
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            await resp.aclose()
            raise UpstreamUnavailable(
                f"model {self.name!r} answered a stream with {ctype or 'no content type'}"
            )
        return SSEStream(resp, self.name)

    async def probe(self, timeout_s: float = 2.0) -> bool:
        """True when any endpoint answers HTTP at all (readiness: the server is up)."""
        for ep in self.endpoints:
            try:
                await self.client.get(ep.base_url + "/models", timeout=timeout_s)
                return True
            except httpx.HTTPError:
                continue
        return False

    async def aclose(self) -> None:
        """Close the pooled client."""
        await self.client.aclose()


def _bind(on_change: Callable[[int, State], None], idx: int) -> Callable[[State], None]:
    return lambda state: on_change(idx, state)


def _pass_headers(resp: httpx.Response) -> dict[str, str]:
    return {h: v for h in PASS_HEADERS if (v := resp.headers.get(h)) is not None}
