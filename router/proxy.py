"""The model endpoints, whatever their wire format: validate, score, route, forward with retry
and teacher fallback. What a format looks like is asked of its `WireFormat` (`router/endpoints/`).

Failure rules:
- Before any byte reaches the client, a connect error, timeout, 5xx or 429 is
  retried on another endpoint of the same model, then the request falls back
  to the teacher (reason `fallback`).
- Upstream 4xx other than 429 is the client's problem: passed through as is, except a
  student's 400 that says the input does not fit it (context too long, images or tools
  unsupported: `router.quality.INPUT_REJECTIONS`), which falls back to the teacher.
- Once a stream has started, the model never changes; an upstream failure or a
  stream that ends without `[DONE]` ends the client's stream with an
  OpenAI-shaped error event, so a truncated answer is never mistaken for a whole one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from classifiers.family import TAG_PATTERN
from router.auth import KeyState, retry_after_header
from router.config import ModelConfig
from router.endpoints import WireFormat
from router.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientClosed,
    GatewayError,
    InvalidRequest,
    Overloaded,
    RateLimited,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from router.exchange import Exchange, QualityFailure
from router.gateway import Gateway
from router.limits import Admission
from router.logs import ACCESS, UPSTREAM, event
from router.policy import RequestContext
from router.quality import check_answer, input_rejection
from router.records import PASSED
from router.server import BODY_COMPLETE
from router.streaming import GatewayStream, stream_attempt
from router.upstream import ModelPool, UpstreamReply

__all__ = ["error_response", "handle_completion", "read_request"]

_REQUEST_ID_MAX = 128
# Integer fields of any format: JSON may write them as 16.0, forwarded and counted as 16.
_WHOLE_NUMBERS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "top_k", "dimensions")
# The encoder that re-serialises a body for the upstream stops at this depth; deeper
# bodies are refused up front. Only a body with more brackets can nest that deep.
_ENCODER_MAX_DEPTH = 254
# Longest conversation accepted: validating one costs about 3.5 µs a message, all of it
# on the event loop, so this bounds the stall one request can cause (about 35 ms).
MAX_MESSAGES = 10_000
# Scope key the app sets when the client disconnected and the handler was cancelled.
CLIENT_GONE = "triage.client_gone"
_EXCHANGE = "triage.exchange"
_ADMITTED = "triage.admitted"
# uuid4's version and variant bits, set on 128 random bits: `uuid.uuid4().hex` without the
# UUID object.
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)

# A request's headers by lower-case name (`_header_map`).
Headers = dict[bytes, bytes]


def _header_map(request: Request) -> Headers:
    """The request's headers by name, the first of a repeated one winning (as `Headers.get`).

    One pass over the list, where each `request.headers.get` scans it again and raises and
    catches a KeyError for a missing header, as most of the gateway's own headers are.
    """
    return dict(reversed(request.scope["headers"]))


def _header(headers: Headers, name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


async def _read_body(request: Request, headers: Headers, limit: int, timeout_s: float) -> bytes:
    declared = _header(headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Request body is larger than the {limit}-byte limit.")
    chunks = []
    size = 0
    # A body trickled in byte by byte would otherwise hold its connection forever; one that
    # has all arrived (the server says so in the scope) is read without waiting.
    deadline = None if request.scope.get(BODY_COMPLETE) else _Deadline(timeout_s)
    receive = request.receive
    try:
        # What `request.stream()` does, without an async generator around each chunk.
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"Request body is larger than the {limit}-byte limit.")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            elif kind == "http.disconnect":
                raise ClientClosed("The client closed the connection before its request body arrived.")
    except asyncio.CancelledError:
        if deadline is None or not deadline.absorbed():
            raise
        raise BodyTimeout(f"The request body did not arrive within {timeout_s:g} s.") from None
    finally:
        if deadline is not None:
            deadline.cancel()
    return b"".join(chunks)


class _Deadline:
    """Cancels the running task after `timeout_s` unless cancelled first.

    What `asyncio.timeout` does, for a fraction of its cost on the hot path (one timer, and
    one lookup of the task where `asyncio.timeout` makes two, each a `getpid` system call).
    After a CancelledError, `absorbed()` tells whether it was this deadline's.
    """

    __slots__ = ("_task", "_timer", "expired")

    def __init__(self, timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None  # (only ever used inside a request's task)
        self._task = task
        self.expired = False
        self._timer = task.get_loop().call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def absorbed(self) -> bool:
        """Whether the CancelledError being handled came from this deadline (it is then spent)."""
        if not self.expired:
            return False
        self._task.uncancel()
        return True

    def cancel(self) -> None:
        """The guarded work is over: the deadline no longer applies."""
        self._timer.cancel()


def _validation_error(exc: ValidationError, payload: Any) -> InvalidRequest:
    """One 400 naming the field at fault, as the client wrote it.

    pydantic's location of an error inside a union names the alternative tried
    (`input.constrained-str`, `input.list[str].0`); those names mean nothing to a
    client, so only the parts that exist in the body are kept, and the union's
    alternatives for the first field at fault are listed together.
    """
    errors = exc.errors(include_url=False)
    located = [(_in_body(err["loc"], payload), err["msg"]) for err in errors]
    param = located[0][0]
    messages = list(dict.fromkeys(msg for where, msg in located if where == param))
    message = "; or ".join(messages)
    if param:
        message = f"{param}: {message}"
    others = sum(1 for where, _ in located if where != param)
    if others:
        message += f" (and {others} more error(s))"
    return InvalidRequest(message, param=param)


def _in_body(loc: tuple[int | str, ...], payload: Any) -> str | None:
    parts: list[str] = []
    node = payload
    for i, part in enumerate(loc):
        if isinstance(node, dict):
            if part in node:
                parts.append(str(part))
                node = node[part]
            elif i == len(loc) - 1:
                parts.append(str(part))  # a missing field is always last in its location
            # else: a union member's tag, not a field of the body
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(str(part))
            node = node[part]
        # else: a union alternative's name (or a position that is not there): not the client's
    return ".".join(parts) or None


def _parse(body: bytes, fmt: WireFormat, max_containers: int) -> dict[str, Any]:
    # Parsing costs time and memory per object and array (a 4 MiB body of `[]`s takes
    # seconds and ~100 MiB); counting their opening brackets first is cheap and exact
    # enough (brackets inside strings count too).
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > max_containers:
        raise InvalidRequest(
            f"The request body has more than {max_containers} JSON objects and arrays "
            "(server.max_json_containers)."
        )
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if brackets > _ENCODER_MAX_DEPTH:
        try:
            orjson.dumps(payload)
        except orjson.JSONEncodeError:
            raise InvalidRequest(
                f"The request body nests JSON deeper than {_ENCODER_MAX_DEPTH} levels."
            ) from None
    for key in ("messages", "input"):
        turns = payload.get(key)
        if isinstance(turns, list) and len(turns) > MAX_MESSAGES:
            raise InvalidRequest(f"A conversation may have at most {MAX_MESSAGES} messages.", param=key)
    try:
        request = fmt.request_model.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc, payload) from None
    for key in _WHOLE_NUMBERS:
        # 16.0 is accepted as 16; forward and count with the integer.
        if isinstance(payload.get(key), float):
            value = getattr(request, key, None)
            if isinstance(value, int):
                payload[key] = value
    fmt.check(payload)
    return payload


def _request_id(headers: Headers) -> str:
    given = _header(headers, b"x-request-id")
    if given and len(given) <= _REQUEST_ID_MAX and given.isprintable():
        return given
    return "%032x" % (int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET)


def _budget_header(headers: Headers) -> float | None:
    raw = _header(headers, b"x-triage-escalation-budget-usd")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(
            "x-triage-escalation-budget-usd must be a non-negative number of dollars.",
            param="x-triage-escalation-budget-usd",
        )
    return value


def _family_header(headers: Headers) -> str | None:
    """The client's own workload tag, kept in the request's record for per-workload reports."""
    raw = _header(headers, b"x-triage-family")
    if raw is None:
        return None
    tag = raw.strip().lower()
    if not TAG_PATTERN.match(tag):
        raise InvalidRequest(
            "x-triage-family must be a short name: a letter or digit, then up to 31 letters, "
            "digits, '.', '_' or '-'.",
            param="x-triage-family",
        )
    return tag


async def handle_completion(request: Request, fmt: WireFormat) -> Response:
    """Serve one model request in the client's wire format (chat, Responses, Messages, …)."""
    gw: Gateway = request.app.state.gateway
    # Held before the first await, so a reload cannot retire this gateway (and close its
    # upstream clients) while the request is still reading its body.
    gw.enter()
    response: Response | None = None
    try:
        response = await _handle(request, fmt, gw)
        return response
    except asyncio.CancelledError:
        if request.scope.get(CLIENT_GONE):
            _client_gone(request.scope.get(_EXCHANGE))
        raise
    finally:
        if not isinstance(response, GatewayStream):
            # A stream releases the gateway when its last event is sent.
            gw.leave(admitted=request.scope.get(_ADMITTED, False))


def _client_gone(ex: Exchange | None) -> None:
    """The client left before its answer: upstream work was cancelled; count and log it."""
    if ex is None:
        return  # still reading the body: nothing was sent upstream
    ex.client_left(ex.decision.model.name, ex.decision.reason)


def _rejected(
    gw: Gateway,
    fmt: WireFormat,
    request_id: str,
    exc: GatewayError,
    key: str | None,
) -> None:
    gw.metrics.rejected.labels(str(exc.status_code)).inc()
    if ACCESS.isEnabledFor(logging.INFO):
        code = exc.code if exc.code is not None else exc.type
        event(
            ACCESS,
            logging.INFO,
            "rejected",
            request_id=request_id,
            key=key,
            endpoint=fmt.name,
            status=exc.status_code,
            error=code,
        )


async def read_request(request: Request, fmt: WireFormat, gw: Gateway) -> tuple[Any, dict[str, Any]]:
    """Authenticate, admit against the key's limits, read and validate the body.

    Returns (the caller's key state or None, the payload). Raises GatewayError.
    """
    key, payload, admission = await _read(request, _header_map(request), fmt, gw)
    if admission is not None:
        await _admitted(gw, key, admission)
    return key, payload


async def _read(
    request: Request, headers: Headers, fmt: WireFormat, gw: Gateway
) -> tuple[KeyState | None, dict[str, Any], Admission | None]:
    """`read_request`, with a key's shared admission still on its way from Redis."""
    key = None
    admission = None
    if gw.auth.enabled:
        key = gw.auth.authenticate(_header(headers, b"authorization"), _header(headers, b"x-api-key"))
    if key is not None:
        if key.shared is None:
            try:
                key.admit()
            except RateLimited as exc:
                gw.metrics.rate_limited.labels(key.name, str(exc.code)).inc()
                raise
        else:
            admission = key.shared.admit(key.name)
            if not admission.done():
                # One turn of the event loop sends the batch: its round trip then overlaps
                # reading, parsing and scoring the request.
                await asyncio.sleep(0)
    config = gw.config
    body = await _read_body(request, headers, config.server.max_body_bytes, config.server.body_timeout_s)
    return key, _parse(body, fmt, config.server.max_json_containers), admission


async def _admitted(gw: Gateway, key: Any, admission: Admission) -> None:
    """Wait for a shared admission; RateLimited (counted) when the key's limits refuse it."""
    try:
        await key.shared.check(key.name, admission)
    except RateLimited as exc:
        gw.metrics.rate_limited.labels(key.name, str(exc.code)).inc()
        raise


async def _handle(request: Request, fmt: WireFormat, gw: Gateway) -> Response:
    started = time.perf_counter()
    headers = _header_map(request)
    request_id = _request_id(headers)
    config = gw.config
    key = None
    try:
        key, payload, admission = await _read(request, headers, fmt, gw)
        # Refused here, before a score or a decision: a refused request must not steer the policy.
        budget_usd = _budget_header(headers)
        family = _family_header(headers)
        gw.admit()
        request.scope[_ADMITTED] = True
        prompt = fmt.prompt(payload)
        requested: str = payload["model"]
        override = _header(headers, b"x-triage-route")
        policy = gw.policy
        score = None
        if fmt.scored and policy.needs_score(requested, override, fmt.name):
            t = time.perf_counter()
            score = gw.scorer.score_text(prompt.text)
            gw.metrics.classifier_duration.observe(time.perf_counter() - t)
            gw.metrics.score.observe(score)
        if admission is not None:
            # Before the policy learns from this request (a refused one must not steer it).
            await _admitted(gw, key, admission)
        decision = policy.decide(
            RequestContext(
                fmt.name,
                requested,
                override,
                score,
                policy.estimate_tokens(prompt.chars, prompt.images) + prompt.budget,
                prompt.needs,
                None if key is None else key.name,
            )
        )
    except GatewayError as exc:
        _rejected(gw, fmt, request_id, exc, None if key is None else key.name)
        answer = {"x-request-id": request_id}
        if isinstance(exc, RateLimited):
            answer.update(retry_after_header(exc.retry_after_s))
        return error_response(exc, fmt, answer)
    gw.metrics.routing_decisions.labels(decision.model.name, decision.reason).inc()
    opted_out = (_header(headers, b"x-triage-fallback") or "").lower() == "off"
    stream = fmt.wants_stream(payload)
    cascade = config.routing.cascade
    ex = Exchange(
        gateway=gw,
        fmt=fmt,
        request_id=request_id,
        started=started,
        payload=payload,
        prompt=prompt,
        decision=decision,
        stream=stream,
        client_wants_usage=stream and fmt.wants_usage_event(payload),
        quality_on=cascade.enabled and not opted_out,
        fallback_on=config.routing.fallback_to_teacher and not opted_out,
        escalation_budget_usd=budget_usd if budget_usd is not None else cascade.max_escalation_usd,
        key=key,
        arrived=time.time() - (time.perf_counter() - started),
        threshold_factor=policy.factor,
        capture=bool(gw.recorder.sinks) and gw.recorder.wants_capture(),
        family=family,
    )
    request.scope[_EXCHANGE] = ex
    # The attempts, under the overall request deadline (run here rather than in a helper
    # coroutine: each call and suspension of the request passes every coroutine frame).
    gw.retry_budget.on_request()
    deadline = _Deadline(config.routing.request_deadline_s)
    try:
        return await _attempts(ex)
    except asyncio.CancelledError:
        if not deadline.absorbed():
            raise
        return _deadline_passed(ex)
    finally:
        deadline.cancel()


def _deadline_passed(ex: Exchange) -> Response:
    """The request deadline ended the attempts: count, record and answer 504."""
    gw = ex.gateway
    model = ex.decision.model
    gw.metrics.deadline_exceeded.labels(model.name).inc()
    exc = UpstreamTimeout(f"the request did not complete within {gw.config.routing.request_deadline_s:g} s")
    ex.finish(model.name, ex.decision.reason, exc.status_code, answered=False, note="deadline")
    return error_response(exc, ex.fmt, ex.headers(None, ex.decision.reason))


def _retry_after_s(exc: UpstreamStatus) -> float | None:
    if exc.retry_after is None:
        return None
    try:
        return max(float(exc.retry_after), 0.0)
    except ValueError:
        return None  # an HTTP date: the breaker's own open time applies


async def _attempts(ex: Exchange) -> Response:
    """Try the chosen model (with retries), then the teacher; answer with the first success."""
    gw = ex.gateway
    plan = [ex.decision.model]
    if ex.fallback_on and ex.decision.model.role == "student":
        plan.append(gw.teacher)
    # The last failure, kept without its traceback: that holds this frame, which holds `last`,
    # a cycle that would keep the whole exchange until the cycle collector runs.
    last: GatewayError | None = None
    made = 0  # attempts sent upstream so far
    for step, model in enumerate(plan):
        reason = ex.decision.reason if step == 0 else "fallback"
        if step > 0 and isinstance(last, UpstreamError) and ex.fallback_reason is None:
            fb = "timeout" if isinstance(last, UpstreamTimeout) else "upstream_error"
            gw.metrics.fallbacks.labels(plan[0].name, fb).inc()
            ex.fallback_reason = fb
        if step > 0:
            event(
                UPSTREAM,
                logging.WARNING,
                "fallback",
                request_id=ex.request_id,
                model=plan[0].name,
                to=model.name,
                reason=ex.fallback_reason,
                detail=None if last is None else last.message,
            )
        pool = gw.pools[model.name]
        tried: set[int] = set()
        for _ in range(1 + gw.config.routing.retries_per_model):
            idx = pool.pick(tried)
            if idx is None:
                if last is None:
                    last = UpstreamUnavailable(f"model {model.name!r} has no healthy endpoint")
                break
            # Extra attempts caused by upstream failures spend the retry budget;
            # a quality escalation is bounded by the cascade's own budget instead.
            if made and isinstance(last, UpstreamError) and not gw.retry_budget.try_spend():
                pool.release(idx)
                gw.metrics.retry_budget_exhausted.inc()
                return _give_up(ex, plan[: step + 1], last)
            tried.add(idx)
            made += 1
            ex.attempted.append(model.name)
            verdict = False
            inflight = gw.metrics.level(gw.metrics.inflight.labels(model.name))
            inflight.value += 1
            try:
                if ex.stream:
                    response: Response = await stream_attempt(ex, pool, idx, model, reason)
                else:
                    response = await _json_attempt(ex, pool, idx, model, reason)
                pool.mark_ok(idx)
                verdict = True
                return response
            except QualityFailure as exc:
                pool.mark_ok(idx)
                verdict = True
                last = exc.with_traceback(None)
                break  # the answer was bad, not the endpoint: go straight to the teacher
            except Overloaded as exc:
                # No free pooled connection in time: nothing reached the upstream, so this
                # is neither an endpoint failure (the claim is released, not failed) nor a
                # reason to send the request to another model.
                ex.attempted.pop()
                ex.finish(model.name, reason, exc.status_code, answered=False, note="pool_timeout")
                return error_response(exc, ex.fmt, ex.headers(None, reason))
            except UpstreamError as exc:
                gw.metrics.upstream_errors.labels(model.name, exc.kind).inc()
                verdict = True
                if isinstance(exc, UpstreamStatus) and not exc.retryable:
                    pool.mark_ok(idx)
                    rejected = input_rejection(exc.status_code, exc.content) if step + 1 < len(plan) else None
                    if rejected is None:
                        # the client's error, passed on as it is
                        ex.finish(model.name, reason, exc.status_code)
                        return error_response(exc, ex.fmt, ex.headers(model, reason))
                    # The student cannot take this input (too long, images, tools): the teacher may.
                    gw.metrics.fallbacks.labels(model.name, rejected).inc()
                    ex.fallback_reason = rejected
                    last = exc.with_traceback(None)
                    break
                retry_after = _retry_after_s(exc) if isinstance(exc, UpstreamStatus) else None
                pool.mark_failed(idx, retry_after if exc.status_code == 429 else None)
                last = exc.with_traceback(None)
                event(
                    UPSTREAM,
                    logging.WARNING,
                    "upstream failed",
                    request_id=ex.request_id,
                    model=model.name,
                    endpoint=idx,
                    error=exc.message,
                )
            finally:
                if not verdict:
                    pool.release(idx)
                inflight.value -= 1
    assert last is not None
    return _give_up(ex, plan, last)


def _give_up(ex: Exchange, plan: list[ModelConfig], last: GatewayError) -> Response:
    final = plan[-1]
    reason = ex.decision.reason if len(plan) == 1 else "fallback"
    # Only a model whose own error status is passed on is named as having answered.
    answered = isinstance(last, UpstreamStatus) and ex.attempted[-1:] == [final.name]
    ex.finish(final.name, reason, last.status_code, answered=answered, note=last.message)
    return error_response(last, ex.fmt, ex.headers(final if answered else None, reason))


async def _json_attempt(ex: Exchange, pool: ModelPool, idx: int, model: ModelConfig, reason: str) -> Response:
    gw = ex.gateway
    leg = ex.leg(model)
    wire = leg.wire
    t = time.perf_counter()
    try:
        reply: UpstreamReply = await pool.post(
            idx, wire.upstream_path, ex.body_for(model, leg), ex.request_id
        )
    finally:
        elapsed = time.perf_counter() - t
        ex.upstream_s += elapsed
        gw.metrics.upstream_duration.labels(model.name).observe(elapsed)
    try:
        parsed = orjson.loads(reply.content)
    except orjson.JSONDecodeError:
        parsed = None
    if not wire.well_shaped(parsed):
        # A 200 whose body is not an answer would reach the client as a
        # corrupt answer; treat it as a failed attempt instead.
        raise UpstreamUnavailable(f"model {model.name!r} returned a malformed answer")
    answer = wire.answer(parsed)
    usage = wire.usage(parsed) or ex.estimate((len(answer.text) + 3) // 4)
    content = reply.content
    if ex.checks_apply(model):
        failed = check_answer(answer, model.checks, ex.prompt, gw.refusals[model.name])
        if failed is not None and ex.may_escalate(usage):
            raise ex.fail_quality(model, failed, usage)
        ex.quality = PASSED
        if ex.strip_logprobs:
            wire.strip_logprobs(parsed)
            content = orjson.dumps(parsed)
        if gw.shadow.sample():
            ex.compare(model, leg, answer.text, None, exploring=False)
    elif ex.explores(model):
        ex.compare(model, leg, answer.text, wire.usage(parsed), exploring=True)
    if ex.capture:
        ex.answer_text = answer.text
    if leg.translation is not None:
        content = orjson.dumps(leg.translation.response(parsed, ex.payload, model.upstream_model))
    ex.record(model.name, usage, served=True)
    ex.finish(model.name, reason, reply.status_code)
    headers = ex.headers(model, reason)
    headers.update(reply.headers)
    return Response(content, reply.status_code, headers, media_type="application/json")


def error_response(exc: GatewayError, fmt: WireFormat, headers: dict[str, str]) -> Response:
    """The one place a gateway error becomes a response: in the client's format's envelope."""
    if isinstance(exc, UpstreamStatus) and exc.retry_after:
        headers = {**headers, "retry-after": exc.retry_after}
    elif isinstance(exc, Overloaded):
        headers = {**headers, **retry_after_header(exc.retry_after_s)}
    return Response(fmt.error_body(exc), exc.status_code, headers, media_type="application/json")
