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

from router.accounting import Usage
from router.config import ModelConfig
from router.endpoints import WireFormat
from router.endpoints.base import Malformed, StreamAnswer
from router.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable, has_error_message
from router.exchange import Exchange, Leg
from router.logs import UPSTREAM, event
from router.quality import check_answer
from router.records import PASSED
from router.sse import SSEStream
from router.upstream import ModelPool

__all__ = ["GatewayStream", "stream_attempt"]


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
            # `abandon` holds the exchange, which holds this response: let go of both now, so a
            # finished stream is freed by its reference count, not by the cycle collector.
            self.abandon = self.close_upstream = None


# An event as received, the JSON it carries (None for `[DONE]`), and whether it ends the stream.
_Event = tuple[bytes, Any, bool]


class _Upstream:
    """One upstream stream read in its wire format: events, and whether it has ended."""

    __slots__ = ("ended", "model", "stream", "wire")

    def __init__(self, stream: SSEStream, wire: WireFormat, model: ModelConfig) -> None:
        self.stream = stream
        self.wire = wire
        self.model = model
        self.ended = False

    async def next(self) -> _Event | None:
        """The next event that carries data (or `[DONE]`), or None at the end of the body.

        Comment and empty events (keep-alives) are dropped: they carry nothing for the
        client, and they must not keep a stream alive on their own, so data has to come
        within the model's `read_timeout_s` however many of them arrive.
        """
        model = self.model
        stream = self.stream
        deadline = time.monotonic() + model.read_timeout_s
        while True:
            raw = await stream.next_event()
            if raw is None:
                return None
            try:
                obj = self.wire.decode_event(raw)
            except Malformed:
                raise UpstreamUnavailable(f"model {model.name!r} sent a malformed stream event") from None
            if obj is not None or stream.done:
                last = self.ended = self.wire.ends(obj, stream.done)
                return raw, obj, last
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
    leg = ex.leg(model)
    wire = leg.wire
    stream = await pool.open_stream(idx, wire.upstream_path, ex.body_for(model, leg), ex.request_id)
    upstream = _Upstream(stream, wire, model)
    held: list[_Event] = []
    try:
        first = await upstream.next()
        if first is None or first[1] is None or wire.stream_error(first[1]):
            raise UpstreamUnavailable(f"model {model.name!r} ended its stream before answering")
        held.append(first)
        ex.ttft_s = time.perf_counter() - ex.started
        gw.metrics.ttft.labels(model.name).observe(ex.ttft_s)
        if ex.checks_apply(model):
            await _hold_back(ex, upstream, held)
    except BaseException:
        await stream.aclose()
        raise
    finally:
        ex.upstream_s += time.perf_counter() - t
    headers = ex.headers(model, reason)
    headers["cache-control"] = "no-cache"
    response = GatewayStream(
        _pump(ex, upstream, held, leg, reason), media_type="text/event-stream", headers=headers
    )
    response.write_timeout_s = gw.config.server.write_timeout_s
    response.close_upstream = stream.aclose

    async def abandon() -> None:
        ex.client_left(model.name, reason)
        ex.gateway.leave()

    response.abandon = abandon
    ex.response = response
    return response


async def _hold_back(ex: Exchange, upstream: _Upstream, held: list[_Event]) -> None:
    cascade = ex.gateway.config.routing.cascade
    model = upstream.model
    wire = upstream.wire
    answer = StreamAnswer()
    wire.feed(answer, held[0][1])
    window_end = time.perf_counter() + cascade.hold_back_ms / 1000
    while (
        not upstream.ended and answer.events < cascade.hold_back_tokens and time.perf_counter() < window_end
    ):
        item = await upstream.next()
        if item is None:
            raise UpstreamUnavailable(f"model {model.name!r} ended its stream early")
        if wire.stream_error(item[1]):
            raise UpstreamUnavailable(f"model {model.name!r} sent an error event")
        held.append(item)
        if item[1] is not None:
            wire.feed(answer, item[1])
    checked = answer.answer(complete=upstream.ended)
    failed = check_answer(checked, model.checks, ex.prompt, ex.gateway.refusals[model.name])
    if failed is None:
        ex.quality = PASSED
        return
    usage = ex.estimate(answer.events)
    for _, obj, _ in held:
        if obj is not None:
            usage = wire.event_usage(obj, usage) or usage
    if ex.may_escalate(usage):
        raise ex.fail_quality(model, failed, usage)


async def _pump(
    ex: Exchange, upstream: _Upstream, held: list[_Event], leg: Leg, reason: str
) -> AsyncIterator[bytes]:
    gw = ex.gateway
    if ex.response is not None:
        ex.response.started = True
    model = upstream.model
    stream = upstream.stream
    wire = leg.wire
    client = ex.fmt  # the client's format: its error events
    translator = None if leg.translation is None else leg.translation.stream(ex.payload, model.upstream_model)
    usage: Usage | None = None
    events = 0
    status = 200
    note: str | None = None
    shadowed = model.role == "student" and gw.shadow.sample()
    explored = not shadowed and ex.explores(model)
    # The answer's text is gathered only for a comparison (either direction) or a captured record.
    collected = StreamAnswer() if shadowed or explored or ex.capture else None
    inflight = gw.metrics.level(gw.metrics.inflight.labels(model.name))
    inflight.value += 1
    out: list[bytes] = []
    first_write = True
    wants_usage = ex.client_wants_usage
    try:
        pending = iter(held)
        item: _Event | None = next(pending)
        while item is not None:
            raw, obj, last = item
            if obj is not None and wire.stream_error(obj):
                status = 502
                note = f"model {model.name!r} sent an error event"
                gw.metrics.upstream_errors.labels(model.name, "status").inc()
                if translator is None and has_error_message(obj):
                    out.append(raw)  # already an error in the client's format: pass it on and stop
                else:
                    out.append(client.error_event(note, "upstream_error"))
                break
            events += 1
            if obj is not None:
                usage = wire.event_usage(obj, usage)
                if collected is not None:
                    wire.feed(collected, obj)
                if translator is not None:
                    out.append(translator.event(obj))
                elif wants_usage or wire.carries_answer(obj):
                    # (a usage-only chunk the client did not ask for is dropped)
                    if ex.strip_logprobs and b'"logprobs"' in raw:
                        wire.strip_logprobs(obj)
                        out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
                    else:
                        out.append(raw)
            if last:
                if translator is not None:
                    out.append(translator.end(usage))
                elif obj is None:
                    out.append(raw)  # `[DONE]`
            item = next(pending, None)
            if item is None and not upstream.ended:
                if out and (first_write or not stream.buffered()):
                    # Send what has arrived before waiting for more; events that came in
                    # together go out together, in one write. The first write never waits.
                    yield b"".join(out)
                    out.clear()
                    first_write = False
                t = time.perf_counter()
                try:
                    item = await upstream.next()
                finally:
                    ex.upstream_s += time.perf_counter() - t
        if out:
            yield b"".join(out)
            out.clear()
        if not upstream.ended and status == 200:
            status = 502
            note = f"model {model.name!r} ended its stream before completing the answer"
            gw.metrics.upstream_errors.labels(model.name, "truncated").inc()
            yield client.error_event(note, "upstream_error")
        elif collected is not None and status == 200:
            text = "".join(collected.text)
            if ex.capture:
                ex.answer_text = text
            if shadowed or explored:
                ex.compare(model, leg, text, usage, exploring=explored)
    except UpstreamError as exc:
        status = exc.status_code
        note = exc.message  # the record and the access log say why, as for an answer that failed whole
        gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
        yield b"".join(out) + client.error_event(exc.message, exc.type)
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
