"""The completion endpoints: validate, score, route, forward with retry and teacher fallback.

Failure rules:
- Before any byte reaches the client, a connect error, timeout, 5xx or 429 is
  retried on another endpoint of the same model, then the request falls back
  to the teacher (reason `fallback`).
- Upstream 4xx other than 429 is the client's problem: passed through as is.
- Once a stream has started, the model never changes; an upstream failure or a
  stream that ends without `[DONE]` ends the client's stream with an
  OpenAI-shaped error event, so a truncated answer is never mistaken for a whole one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from classifiers import Scorer, prompt_text
from router.accounting import Accountant, Usage, usage_from_body, usage_from_event
from router.config import Config, ModelConfig
from router.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from router.metrics import Metrics
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.routing import Decision, Router
from router.upstream import ModelPool, SSEStream, UpstreamReply

__all__ = ["Endpoint", "Gateway", "handle_completion"]

Endpoint = Literal["chat", "completions"]
_PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completions": "/completions"}
_MODELS: dict[Endpoint, type[BaseModel]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}
_REQUEST_ID_MAX = 128


class Gateway:
    """Everything a request handler needs, built once at start and shared."""

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

    async def aclose(self) -> None:
        """Close every upstream client."""
        for pool in self.pools.values():
            await pool.aclose()


@dataclass(slots=True)
class _Request:
    """Per-request facts shared by the attempt loop and the response."""

    gateway: Gateway
    endpoint: Endpoint
    request_id: str
    started: float
    payload: dict[str, Any]
    decision: Decision
    stream: bool
    client_wants_usage: bool
    prompt_chars: int
    upstream_s: float = 0.0

    def headers(self, model: ModelConfig, reason: str) -> dict[str, str]:
        h = {
            "x-triage-model": model.name,
            "x-triage-reason": reason,
            "x-request-id": self.request_id,
        }
        if self.decision.score is not None:
            h["x-triage-score"] = f"{self.decision.score:.3f}"
        return h

    def body_for(self, model: ModelConfig) -> bytes:
        payload = dict(self.payload)
        payload["model"] = model.upstream_model
        if self.stream:
            # Always ask for usage so tokens and cost are exact; the extra
            # chunk is removed again when the client did not ask for it.
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            payload["stream_options"] = options
        return orjson.dumps(payload)

    def finish(self, model: str, reason: str, status: int) -> None:
        m = self.gateway.metrics
        total = time.perf_counter() - self.started
        m.requests.labels(model, reason, f"{status // 100}xx").inc()
        m.request_duration.labels(model).observe(total)
        m.overhead.observe(max(total - self.upstream_s, 0.0))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Request body is larger than the {limit}-byte limit.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body is larger than the {limit}-byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    param = ".".join(loc) if loc else None
    message = f"{param}: {err['msg']}" if param else err["msg"]
    if exc.error_count() > 1:
        message += f" (and {exc.error_count() - 1} more error(s))"
    return InvalidRequest(message, param=param)


def _parse(body: bytes, endpoint: Endpoint) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        _MODELS[endpoint].model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    return payload


def _prompt(payload: Mapping[str, Any], endpoint: Endpoint) -> tuple[str, int]:
    """(text to score, characters the upstream will read)."""
    if endpoint == "chat":
        messages = payload["messages"]
        chars = 0
        for m in messages:
            c = m.get("content")
            chars += len(c) if isinstance(c, str) else len(orjson.dumps(c)) if c else 0
        return prompt_text(messages), chars
    prompt = payload["prompt"]
    text = prompt if isinstance(prompt, str) else "\n".join(prompt)
    return text, len(text)


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= _REQUEST_ID_MAX and given.isprintable():
        return given
    return uuid.uuid4().hex


async def handle_completion(request: Request, endpoint: Endpoint) -> Response:
    """Serve POST /v1/chat/completions or /v1/completions."""
    gw: Gateway = request.app.state.gateway
    started = time.perf_counter()
    request_id = _request_id(request)
    config = gw.config
    try:
        body = await _read_body(request, config.server.max_body_bytes)
        payload = _parse(body, endpoint)
        text, chars = _prompt(payload, endpoint)
        requested: str = payload["model"]
        override = request.headers.get("x-triage-route")
        score = None
        if gw.router.needs_score(requested, override):
            t = time.perf_counter()
            score = gw.scorer.score_text(text)
            gw.metrics.classifier_duration.observe(time.perf_counter() - t)
            gw.metrics.score.observe(score)
        budget = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
        decision = gw.router.decide(
            requested, override, score, gw.router.estimate_tokens(chars) + budget
        )
    except GatewayError as exc:
        return _error_response(exc, {"x-request-id": request_id})
    gw.metrics.routing_decisions.labels(decision.model.name, decision.reason).inc()
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    req = _Request(gw, endpoint, request_id, started, payload, decision, stream, wants_usage, chars)
    return await _serve(req)


async def _serve(req: _Request) -> Response:
    gw = req.gateway
    plan = [req.decision.model]
    if gw.config.routing.fallback_to_teacher and req.decision.model.role != "teacher":
        plan.append(gw.teacher)
    last: UpstreamError | None = None
    for step, model in enumerate(plan):
        reason = req.decision.reason if step == 0 else "fallback"
        if step > 0 and last is not None:
            fb = "timeout" if isinstance(last, UpstreamTimeout) else "upstream_error"
            gw.metrics.fallbacks.labels(plan[0].name, fb).inc()
        pool = gw.pools[model.name]
        tried: set[int] = set()
        for _ in range(1 + gw.config.routing.retries_per_model):
            idx = pool.pick(tried)
            if idx is None:
                break
            tried.add(idx)
            gw.metrics.inflight.labels(model.name).inc()
            try:
                if req.stream:
                    return await _stream_attempt(req, pool, idx, model, reason)
                return await _json_attempt(req, pool, idx, model, reason)
            except UpstreamStatus as exc:
                gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
                if not exc.retryable:
                    req.finish(model.name, reason, exc.status_code)
                    return _error_response(exc, req.headers(model, reason))
                pool.mark_failed(idx)
                last = exc
            except UpstreamError as exc:
                gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
                pool.mark_failed(idx)
                last = exc
            finally:
                gw.metrics.inflight.labels(model.name).dec()
    assert last is not None
    final = plan[-1]
    reason = req.decision.reason if len(plan) == 1 else "fallback"
    req.finish(final.name, reason, last.status_code)
    return _error_response(last, req.headers(final, reason))


async def _json_attempt(
    req: _Request, pool: ModelPool, idx: int, model: ModelConfig, reason: str
) -> Response:
    gw = req.gateway
    t = time.perf_counter()
    try:
        reply: UpstreamReply = await pool.post(
            idx, _PATHS[req.endpoint], req.body_for(model), req.request_id
        )
    finally:
        req.upstream_s += time.perf_counter() - t
        gw.metrics.upstream_duration.labels(model.name).observe(time.perf_counter() - t)
    try:
        parsed = orjson.loads(reply.content)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
        # A 200 whose body is not a completion would reach the client as a
        # corrupt answer; treat it as a failed attempt instead.
        raise UpstreamUnavailable(f"model {model.name!r} returned a malformed answer")
    usage = usage_from_body(parsed) or _estimate(req, completion_tokens=_estimate_completion(parsed))
    gw.accountant.record(model.name, usage, served=True)
    req.finish(model.name, reason, reply.status_code)
    headers = req.headers(model, reason)
    headers.update(reply.headers)
    return Response(reply.content, reply.status_code, headers, media_type="application/json")


def _estimate(req: _Request, completion_tokens: int) -> Usage:
    prompt = req.gateway.router.estimate_tokens(req.prompt_chars)
    return Usage(prompt, completion_tokens, estimated=True)


def _estimate_completion(parsed: dict[str, Any]) -> int:
    chars = 0
    for choice in parsed.get("choices") or ():
        if isinstance(choice, dict):
            msg = choice.get("message")
            text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
            if isinstance(text, str):
                chars += len(text)
    return (chars + 3) // 4


async def _stream_attempt(
    req: _Request, pool: ModelPool, idx: int, model: ModelConfig, reason: str
) -> Response:
    gw = req.gateway
    t = time.perf_counter()
    stream = await pool.open_stream(idx, _PATHS[req.endpoint], req.body_for(model), req.request_id)
    try:
        first = await stream.next_event()
    except BaseException:
        await stream.aclose()
        raise
    if first is None or first.startswith((b'data: {"error"', b'data:{"error"')):
        await stream.aclose()
        raise UpstreamUnavailable(f"model {model.name!r} ended its stream before answering")
    gw.metrics.ttft.labels(model.name).observe(time.perf_counter() - req.started)
    req.upstream_s += time.perf_counter() - t
    headers = req.headers(model, reason)
    headers["cache-control"] = "no-cache"
    return StreamingResponse(
        _pump(req, stream, first, model, reason),
        media_type="text/event-stream",
        headers=headers,
        background=BackgroundTask(stream.aclose),
    )


async def _pump(
    req: _Request, stream: SSEStream, first: bytes, model: ModelConfig, reason: str
) -> AsyncIterator[bytes]:
    gw = req.gateway
    usage: Usage | None = None
    events = 0
    status = 200
    gw.metrics.inflight.labels(model.name).inc()
    try:
        event: bytes | None = first
        while event is not None:
            events += 1
            found, usage_only = usage_from_event(event)
            if found is not None:
                usage = found
            if not (usage_only and not req.client_wants_usage):
                yield event
            if stream.done:
                break
            t = time.perf_counter()
            try:
                event = await stream.next_event()
            finally:
                req.upstream_s += time.perf_counter() - t
        if not stream.done:
            status = 502
            gw.metrics.upstream_errors.labels(model.name, "truncated").inc()
            yield _error_event(
                f"model {model.name!r} ended its stream before completing the answer",
                "upstream_error",
            )
    except UpstreamError as exc:
        status = exc.status_code
        gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
        yield _error_event(exc.message, exc.type)
    finally:
        gw.metrics.inflight.labels(model.name).dec()
        # One event per token is how OpenAI-compatible servers stream; minus
        # the role and finish chunks it is a fair estimate when usage is absent.
        gw.accountant.record(model.name, usage or _estimate(req, max(events - 2, 0)), served=True)
        req.finish(model.name, reason, status)


def _error_event(message: str, type_: str) -> bytes:
    return b"data: " + error_body(message, type_) + b"\n\n"


def _error_response(exc: GatewayError, headers: dict[str, str]) -> Response:
    if isinstance(exc, UpstreamStatus) and exc.retry_after:
        headers = {**headers, "retry-after": exc.retry_after}
    return Response(exc.body(), exc.status_code, headers, media_type="application/json")
