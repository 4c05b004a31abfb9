"""Gateway exceptions and their OpenAI-shaped wire form.

    GatewayError                    500 internal_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── BodyTooLarge            413 invalid_request_error
    │   ├── BodyTimeout             408 invalid_request_error / request_timeout
    │   └── ClientClosed            499 (logged and counted; nobody is left to read it)
    ├── AuthError                   401 invalid_request_error / invalid_api_key
    ├── RateLimited                 429 rate_limit_error / the limit's name
    ├── ModelNotFound               404 invalid_request_error / model_not_found
    ├── ModelNotAllowed             403 invalid_request_error / model_not_allowed
    ├── Overloaded                  503 server_error / overloaded (with Retry-After)
    └── UpstreamError               502 upstream_error
        ├── UpstreamUnavailable     502 upstream_error (connect refused, reset, bad body)
        │   ├── UpstreamTooLarge    502 upstream_error (answer over max_response_bytes)
        │   └── UpstreamRedirect    502 upstream_error (a 3xx: never followed)
        ├── UpstreamTimeout         504 upstream_timeout
        └── UpstreamStatus          upstream's own 4xx/5xx status; its body only if OpenAI-shaped

The wire shape is `{"error": {"message", "type", "param", "code"}}`, as the
official OpenAI SDK parses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

__all__ = [
    "AuthError",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientClosed",
    "GatewayError",
    "InvalidRequest",
    "ModelNotAllowed",
    "ModelNotFound",
    "Overloaded",
    "RateLimited",
    "UpstreamError",
    "UpstreamRedirect",
    "UpstreamStatus",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnavailable",
    "error_body",
    "has_error_message",
    "map_upstream_errors",
    "safe_header_value",
]


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> bytes:
    """Serialise an OpenAI error envelope."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class GatewayError(Exception):
    """Base of every error the gateway turns into an HTTP response."""

    status_code = 500
    type = "internal_error"
    code: str | int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """The OpenAI error envelope for this error."""
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(GatewayError):
    """The client's request is malformed or names something impossible."""

    status_code = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    """The request body exceeds `server.max_body_bytes`."""

    status_code = 413
    code = "request_too_large"


class BodyTimeout(InvalidRequest):
    """The request body did not arrive within `server.body_timeout_s`."""

    status_code = 408
    code = "request_timeout"


class ClientClosed(InvalidRequest):
    """The client closed its connection before its request body arrived (nginx's 499)."""

    status_code = 499
    code = "client_closed_request"


class AuthError(GatewayError):
    """Missing or wrong API key."""

    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RateLimited(GatewayError):
    """A per-key limit was reached; `retry_after_s` when waiting will help."""

    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, code: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class ModelNotFound(GatewayError):
    """The `model` is neither the routing alias nor a configured model."""

    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotAllowed(GatewayError):
    """The client may not pin this model (routing.pinnable_models / auth.pinning)."""

    status_code = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class Overloaded(GatewayError):
    """The gateway is at an admission limit: too many requests in flight, or no pooled
    connection came free in time. Not an upstream failure: nothing was sent upstream,
    no breaker counts it and it causes no fallback. The client should retry later."""

    status_code = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamError(GatewayError):
    """An upstream model server failed."""

    status_code = 502
    type = "upstream_error"
    # Bounded label value for metrics: what kind of failure this was.
    kind = "error"


class UpstreamUnavailable(UpstreamError):
    """Connect refused, connection reset, or a body that is not what the protocol promises."""

    kind = "unavailable"


class UpstreamTooLarge(UpstreamUnavailable):
    """The upstream's answer is larger than the model's `max_response_bytes`."""

    kind = "too_large"


class UpstreamRedirect(UpstreamUnavailable):
    """The upstream answered 3xx. Never followed: the prompt would be re-sent to another host."""

    kind = "redirect"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within its configured timeout."""

    status_code = 504
    type = "upstream_timeout"
    kind = "timeout"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status, passed on to the client with a safe body.

    The body goes through only when it is an OpenAI error envelope; anything else
    (an HTML page, a stack trace, a proxy's "connect to http://10.… failed") is
    replaced by the gateway's own envelope, so no upstream text reaches the client.
    """

    kind = "status"

    def __init__(self, status_code: int, content: bytes, retry_after: str | None = None) -> None:
        super().__init__(f"upstream model returned HTTP {status_code}")
        self.status_code = status_code
        self.content = content
        self.retry_after = _retry_after(retry_after)

    @property
    def retryable(self) -> bool:
        """5xx and 429 may succeed elsewhere; other 4xx are the client's to fix."""
        return self.status_code >= 500 or self.status_code == 429

    def parsed(self) -> Any:
        """The upstream's body as JSON; None when it is not JSON."""
        try:
            return orjson.loads(self.content)
        except orjson.JSONDecodeError:
            return None

    def body(self) -> bytes:
        """The upstream's body when it is OpenAI-shaped; else the gateway's envelope."""
        parsed = self.parsed()
        if has_error_message(parsed):
            return self.content
        return error_body(self.message, self.type, None, self.status_code)


def has_error_message(parsed: Any) -> bool:
    """Whether JSON carries an `error` object with a string `message`.

    openai-python reads `body["error"]` so (types/shared/error_object.py), and Anthropic's
    envelope has the same object; anything else would surface as garbage.
    """
    if not isinstance(parsed, dict):
        return False
    error = parsed.get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str)


# Longest header value passed on from an upstream; real ones are a few dozen bytes.
MAX_HEADER_CHARS = 256


def safe_header_value(value: str | None) -> str | None:
    """`value` when it is short printable ASCII (spaces allowed), else None.

    Starlette encodes header values as latin-1 and uvicorn refuses control bytes,
    so anything else would turn a good answer into a 500.
    """
    if value is None or len(value) > MAX_HEADER_CHARS or not value.isascii() or not value.isprintable():
        return None
    return value


def _retry_after(value: str | None) -> str | None:
    # RFC 9110 10.2.3: delay-seconds (digits) or an HTTP-date; nothing else is meaningful.
    value = safe_header_value(value)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return value
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return value


@contextmanager
def map_upstream_errors(model: str) -> Iterator[None]:
    """Translate client transport exceptions into gateway errors, most specific first.

    Messages name the configured model, never the endpoint URL or a key.
    """
    try:
        yield
    except TimeoutError:  # aiohttp's ServerTimeoutError and ConnectionTimeoutError are ones too
        raise UpstreamTimeout(f"model {model!r} did not answer in time") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamUnavailable(f"model {model!r} is unreachable") from None
