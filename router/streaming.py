"""Streaming responses: hold back and check the first events, then pass events through as they arrive.

Inside the hold-back window nothing has reached the client, so a failed check,
an upstream error event or a stream that ends early can still move the request
to another endpoint or the teacher. After the window the model never changes:
a failure ends the client's stream with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from router.accounting import Usage, usage_from_body
from router.config import ModelConfig
from router.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable, error_body
from router.exchange import Exchange
from router.logs import UPSTREAM, event
from router.protocol import chunk_well_shaped
from router.quality import Answer, check_answer
from router.sse import SSEStream
from router.upstream import ModelPool

__all__ = ["GatewayStream", "stream_attempt"]

_FIELDS = (b"event:", b"id:", b"retry:", b":")


class _Malformed(Exception):
    """An event that is not well-formed SSE carrying a completion chunk (or `[DONE]`)."""


def _decode(event: bytes) -> Any:
    """The JSON an event carries; None for `[DONE]` or an event without data.

    Every event is decoded once, here, and the result serves the integrity
    check, usage accounting, the quality checks and logprob stripping; a
    corrupted stream is thereby reported as an error instead of passed on.
    JSON of the wrong shape (see `router.protocol.chunk_well_shaped`) is as malformed as broken JSON.
    """
    data: list[bytes] = []
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line or line.startswith(_FIELDS):
            continue
        if not line.startswith(b"data:"):
            raise _Malformed
        data.append(line[5:].strip())
    if not data:
        return None
    payload = b"\n".join(data)
    if payload == b"[DONE]":
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _Malformed from None
    if not chunk_well_shaped(obj):
        raise _Malformed
    return obj


def _is_error(obj: Any) -> bool:
    return isinstance(obj, dict) and "error" in obj


class _Held:
    """The answer so far, assembled from held-back events."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.events = 0

    def feed(self, obj: Any) -> None:
        """Add one decoded event; any JSON is safe here, whatever its shape."""
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        self.events += 1
        choice = choices[0]
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(piece, str):
            self.text.append(piece)
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            self.finish_reason = finish
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            for t in lp["content"]:
                value = t.get("logprob") if isinstance(t, dict) else None
                if isinstance(value, float | int) and not isinstance(value, bool) and abs(value) < 1e300:
                    self.logprobs.append(float(value))
        if isinstance(delta, dict) and isinstance(delta.get("tool_calls"), list):
            for call in delta["tool_calls"]:
                if isinstance(call, dict):
                    self._tool_delta(call)

    def _tool_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = 0
        slot = self.tools.setdefault(index, {"name": "", "arguments": ""})
        fn = call.get("function")
        if isinstance(fn, dict):
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    slot[key] += fn[key]

    def answer(self, complete: bool) -> Answer:
        calls = [{"function": t} for t in self.tools.values()] if complete else []
        return Answer("".join(self.text), self.finish_reason, calls, self.logprobs, complete)


class GatewayStream(StreamingResponse):
    """A stream whose pump holds its gateway and admission slot until it ends.

    Every write to the client must complete within `write_timeout_s`: a client that
    stops reading would otherwise hold its upstream connection, pool slot and
    admission slot for as long as it keeps the socket open. However the response
    ends (done, client gone, client stalled), the pump's cleanup runs and the
    upstream stream is closed before `__call__` returns. When the client leaves
    before the first byte, the pump never starts; `abandon` then does its part.
    """

    started = False
    stalled = False
    write_timeout_s = 30.0
    abandon: Callable[[], Awaitable[None]] | None = None
    close_upstream: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.write_timeout_s

        async def send_in_time(message: Message) -> None:
            try:
                async with asyncio.timeout(limit):
                    await send(message)
            except TimeoutError:
                self.stalled = True
                raise

        try:
            await super().__call__(scope, receive, send_in_time)
        except TimeoutError:
            if not self.stalled:
                raise
            event(
                UPSTREAM, logging.WARNING, "client stopped reading a stream; closed it", write_timeout_s=limit
            )
        finally:
            if not self.started and self.abandon is not None:
                await self.abandon()
            elif isinstance(self.body_iterator, AsyncGenerator):
                await self.body_iterator.aclose()  # the pump's cleanup, now rather than at GC
            if self.close_upstream is not None:
                await self.close_upstream()


# An event as received and the JSON it carries (None for `[DONE]`).
_Event = tuple[bytes, Any]


async def _next(stream: SSEStream, model: ModelConfig) -> _Event | None:
    """The next event that carries data (or `[DONE]`), or None at the end of the stream.

    Comment and empty events (keep-alives) are dropped: they carry nothing for the
    client, and they must not keep a stream alive on their own, so data has to come
    within the model's `read_timeout_s` however many of them arrive.
    """
    deadline = time.monotonic() + model.read_timeout_s
    while True:
        event = await stream.next_event()
        if event is None:
            return None
        try:
            obj = _decode(event)
        except _Malformed:
            raise UpstreamUnavailable(f"model {model.name!r} sent a malformed stream event") from None
        if obj is not None or stream.done:
            return event, obj
        if time.monotonic() > deadline:
            raise UpstreamTimeout(
                f"model {model.name!r} sent no data for {model.read_timeout_s:g} s (keep-alives only)"
            )


async def stream_attempt(
    ex: Exchange, pool: ModelPool, idx: int, model: ModelConfig, reason: str
) -> GatewayStream:
    """Open a stream, hold back and check its start; return the response that streams the rest."""
    gw = ex.gateway
    t = time.perf_counter()
    stream = await pool.open_stream(idx, ex.path, ex.body_for(model), ex.request_id)
    held: list[_Event] = []
    try:
        first = await _next(stream, model)
        if first is None or first[1] is None or _is_error(first[1]):
            raise UpstreamUnavailable(f"model {model.name!r} ended its stream before answering")
        held.append(first)
        gw.metrics.ttft.labels(model.name).observe(time.perf_counter() - ex.started)
        if ex.checks_apply(model):
            await _hold_back(ex, stream, model, held)
    except BaseException:
        await stream.aclose()
        raise
    finally:
        ex.upstream_s += time.perf_counter() - t
    headers = ex.headers(model, reason)
    headers["cache-control"] = "no-cache"
    response = GatewayStream(
        _pump(ex, stream, held, model, reason), media_type="text/event-stream", headers=headers
    )
    response.write_timeout_s = gw.config.server.write_timeout_s
    response.close_upstream = stream.aclose

    async def abandon() -> None:
        ex.client_left(model.name, reason)
        ex.gateway.leave()

    response.abandon = abandon
    ex.response = response
    return response


async def _hold_back(ex: Exchange, stream: SSEStream, model: ModelConfig, held: list[_Event]) -> None:
    cascade = ex.gateway.config.routing.cascade
    answer = _Held()
    answer.feed(held[0][1])
    window_end = time.perf_counter() + cascade.hold_back_ms / 1000
    while not stream.done and answer.events < cascade.hold_back_tokens and time.perf_counter() < window_end:
        item = await _next(stream, model)
        if item is None:
            raise UpstreamUnavailable(f"model {model.name!r} ended its stream early")
        if _is_error(item[1]):
            raise UpstreamUnavailable(f"model {model.name!r} sent an error event")
        held.append(item)
        answer.feed(item[1])
    checked = answer.answer(complete=stream.done)
    failed = check_answer(checked, model.checks, ex.payload, ex.gateway.refusals[model.name])
    if failed is None:
        return
    usage = ex.estimate(answer.events)
    for _, obj in held:
        usage = usage_from_body(obj) or usage
    if ex.may_escalate(usage):
        raise ex.fail_quality(model, failed, usage)


def _without_logprobs(obj: Any) -> bytes:
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            choice.pop("logprobs", None)
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _pump(
    ex: Exchange, stream: SSEStream, held: list[_Event], model: ModelConfig, reason: str
) -> AsyncIterator[bytes]:
    gw = ex.gateway
    if ex.response is not None:
        ex.response.started = True
    usage: Usage | None = None
    events = 0
    status = 200
    note: str | None = None
    shadow = _Held() if model.role == "student" and gw.shadow.sample() else None
    inflight = gw.metrics.level(gw.metrics.inflight.labels(model.name))
    inflight.value += 1
    out: list[bytes] = []
    first_write = True
    try:
        pending = iter(held)
        item: _Event | None = next(pending)
        while item is not None:
            event, obj = item
            if _is_error(obj):
                status = 502
                gw.metrics.upstream_errors.labels(model.name, "status").inc()
                error = obj["error"]
                if isinstance(error, dict) and isinstance(error.get("message"), str):
                    out.append(event)  # already an OpenAI-shaped error: pass it on and stop
                else:
                    out.append(_error_event(f"model {model.name!r} sent an error event", "upstream_error"))
                break
            events += 1
            found = usage_from_body(obj)
            if found is not None:
                usage = found
            if shadow is not None:
                shadow.feed(obj)
            if found is None or obj.get("choices") or ex.client_wants_usage:
                # (a usage-only chunk the client did not ask for is dropped)
                strip = ex.strip_logprobs and isinstance(obj, dict) and b'"logprobs"' in event
                out.append(_without_logprobs(obj) if strip else event)
            item = next(pending, None)
            if item is None and not stream.done:
                if out and (first_write or not stream.buffered()):
                    # Send what has arrived before waiting for more; events that came in
                    # together go out together, in one write. The first write never waits.
                    yield b"".join(out)
                    out.clear()
                    first_write = False
                t = time.perf_counter()
                try:
                    item = await _next(stream, model)
                finally:
                    ex.upstream_s += time.perf_counter() - t
        if out:
            yield b"".join(out)
            out.clear()
        if not stream.done and status == 200:
            status = 502
            gw.metrics.upstream_errors.labels(model.name, "truncated").inc()
            yield _error_event(
                f"model {model.name!r} ended its stream before completing the answer", "upstream_error"
            )
        elif shadow is not None:
            gw.shadow.start(model, ex.path, ex.payload, "".join(shadow.text), ex.request_id)
    except UpstreamError as exc:
        status = exc.status_code
        gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
        yield b"".join(out) + _error_event(exc.message, exc.type)
    except (GeneratorExit, asyncio.CancelledError):
        # The client left, or stopped reading for `server.write_timeout_s`.
        status = 499
        stalled = ex.response is not None and ex.response.stalled
        note = "client_stopped_reading" if stalled else "client_disconnected"
        gw.metrics.client_disconnects.labels(model.name).inc()
        raise
    finally:
        inflight.value -= 1
        # One event per token is how OpenAI-compatible servers stream; minus
        # the role and finish chunks it is a fair estimate when usage is absent.
        # A stream that failed is paid for but was not a served answer.
        ex.record(model.name, usage or ex.estimate(max(events - 2, 0)), served=status == 200)
        gw.metrics.upstream_duration.labels(model.name).observe(ex.upstream_s)
        ex.finish(model.name, reason, status, note=note)
        gw.leave()


def _error_event(message: str, type_: str) -> bytes:
    return b"data: " + error_body(message, type_) + b"\n\n"
