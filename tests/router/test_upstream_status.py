"""What an upstream's status line, headers and error body may put in front of the client.

A final status outside 200-599 is a protocol error (fallback or 502), never passed
on; a header value passes only when it is short printable ASCII (Retry-After only
as seconds or an HTTP date); and an error body reaches the client only when it is
an OpenAI error envelope, so upstream text (internal URLs, keys) never does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from router.errors import UpstreamStatus
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.raw_upstream import tcp_server
from tests.router.test_streaming import stream_events, text_of

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "up",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "raw answer"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
)
STREAM = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up",'
    b'"choices":[{"index":0,"delta":{"content":"raw answer"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def reply(status: bytes, body: bytes, *headers: bytes, ctype: bytes = b"application/json") -> bytes:
    """One raw HTTP/1.1 response: `status` is the status line after the version."""
    head = [b"HTTP/1.1 " + status, b"content-type: " + ctype, b"content-length: %d" % len(body)]
    head += [*headers, b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def _handle(response: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)  # an unread request body would make close() send a reset
        writer.write(response)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


@contextmanager
def raw_reply(response: bytes) -> Iterator[str]:
    """Answer every request on a loopback port with exactly `response`; yield the base URL."""
    with tcp_server(lambda r, w: _handle(response, r, w)) as url:
        yield url


def at(urls: dict[str, str], model: int, url: str) -> dict[str, Any]:
    """The standard config with model number `model` (0: student-small, 2: teacher) at `url`."""
    raw = base_config(urls)
    raw["models"][model]["endpoints"] = [url + "/v1"]
    return raw


def ask(gw: Gateway, model: str = "auto") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)


def errors(gw: Gateway, type_: str, model: str = "student-small") -> float:
    return gw.metric("triage_upstream_errors_total", {"model": model, "type": type_})


def assert_envelope(resp: httpx.Response, status: int) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == "upstream_error"
    assert isinstance(error["message"], str)
    assert resp.headers["content-type"] == "application/json"
    assert resp.status_code == status
    return error


# --- (1) a final status outside 200-599 -----------------------------------------------------------

ODD_STATUSES = [b"600 Odd", b"999 Odd", b"099 Odd", b"101 Switching Protocols"]


@pytest.mark.parametrize("status", ODD_STATUSES)
@pytest.mark.parametrize("stream", [False, True])
def test_odd_status_from_a_student_falls_back(
    upstreams: Upstreams, make_gateway: GatewayFactory, status: bytes, stream: bool
) -> None:
    response = reply(status, STREAM, ctype=b"text/event-stream") if stream else reply(status, COMPLETION)
    with raw_reply(response) as url, make_gateway(at(upstreams.urls, 0, url)) as gw:
        if stream:
            resp, events = stream_events(gw)
            assert text_of(events).startswith("teacher-0")
        else:
            resp = ask(gw)
            assert resp.json()["choices"][0]["message"]["content"].startswith("teacher-0")
        assert resp.status_code == 200
        assert resp.headers["x-triage-model"] == "teacher"
        assert resp.headers["x-triage-fallback"] == "upstream_error"
        # A protocol error, not an answered status: it counts like a reset connection.
        assert errors(gw, "unavailable") == 1
        assert errors(gw, "status") == 0


@pytest.mark.parametrize("status", ODD_STATUSES)
@pytest.mark.parametrize("stream", [False, True])
def test_odd_status_from_the_teacher_alone_is_a_502(
    upstreams: Upstreams, make_gateway: GatewayFactory, status: bytes, stream: bool
) -> None:
    response = reply(status, STREAM, ctype=b"text/event-stream") if stream else reply(status, COMPLETION)
    with raw_reply(response) as url, make_gateway(at(upstreams.urls, 2, url)) as gw:
        body = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
        assert_envelope(resp, 502)
        assert errors(gw, "unavailable", "teacher") == 1


# --- (2) passed-through header values -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["ünïcode".encode(), b"12\x01", b"12\x7f", b"\xff\xfe", b"1" * 300],
    ids=["non_ascii", "control", "delete", "not_utf8", "long"],
)
def test_unsafe_header_values_are_dropped(
    upstreams: Upstreams, make_gateway: GatewayFactory, value: bytes
) -> None:
    response = reply(
        b"200 OK",
        COMPLETION,
        b"openai-processing-ms: " + value,
        b"x-ratelimit-remaining-requests: 41",
    )
    with raw_reply(response) as url, make_gateway(at(upstreams.urls, 0, url)) as gw:
        resp = ask(gw)
        assert resp.status_code == 200
        assert resp.headers["x-triage-model"] == "student-small"
        assert resp.json()["choices"][0]["message"]["content"] == "raw answer"
        assert "openai-processing-ms" not in resp.headers
        assert resp.headers["x-ratelimit-remaining-requests"] == "41"  # a clean one still passes


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (b"soon", False),
        (b"-5", False),
        (b"1.5", False),
        (b"7\x01", False),
        ("ünï".encode(), False),
        (b"9" * 300, False),
        (b"7", True),
        (b"Wed, 21 Oct 2015 07:28:00 GMT", True),
    ],
)
def test_retry_after_passes_only_as_seconds_or_a_date(
    upstreams: Upstreams, make_gateway: GatewayFactory, value: bytes, kept: bool
) -> None:
    body = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit_error", "code": 429}})
    response = reply(b"429 Too Many Requests", body, b"retry-after: " + value)
    with raw_reply(response) as url, make_gateway(at(upstreams.urls, 2, url)) as gw:
        resp = ask(gw, "teacher")
        assert resp.status_code == 429
        assert resp.content == body
        if kept:
            assert resp.headers["retry-after"] == value.decode()
        else:
            assert "retry-after" not in resp.headers


# --- (3) upstream error bodies --------------------------------------------------------------------

LEAKY = b"connect to http://10.1.2.3:9000 failed api_key=sk-SECRET"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (LEAKY, b"text/plain"),
        (b"<html><body>" + LEAKY + b"</body></html>", b"text/html"),
        (b'{"detail": "' + LEAKY + b'"}', b"application/json"),
        (b'{"error": 12345}', b"application/json"),
        (b'{"error": "' + LEAKY + b'"}', b"application/json"),
        (b'{"error": {"msg": "' + LEAKY + b'"}}', b"application/json"),
        (b'{"error": {"message": 5}}', b"application/json"),
        (b'[{"error": {"message": "x"}}]', b"application/json"),
    ],
    ids=[
        "text",
        "html",
        "other_json",
        "error_number",
        "error_string",
        "no_message",
        "message_number",
        "list",
    ],
)
def test_error_bodies_not_in_openai_shape_get_the_gateways_envelope(
    upstreams: Upstreams, make_gateway: GatewayFactory, body: bytes, ctype: bytes
) -> None:
    with raw_reply(reply(b"500 Internal Server Error", body, ctype=ctype)) as url:
        with make_gateway(at(upstreams.urls, 2, url)) as gw:
            resp = ask(gw, "teacher")  # pinned: no fallback, the teacher's status is the answer
    error = assert_envelope(resp, 500)
    assert error == {
        "message": "upstream model returned HTTP 500",
        "type": "upstream_error",
        "param": None,
        "code": 500,
    }
    assert b"SECRET" not in resp.content
    assert b"10.1.2.3" not in resp.content


def test_openai_shaped_error_body_passes_through(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    body = orjson.dumps(
        {"error": {"message": "context too long", "type": "invalid_request_error", "code": None}}
    )
    with raw_reply(reply(b"400 Bad Request", body)) as url, make_gateway(at(upstreams.urls, 2, url)) as gw:
        resp = ask(gw, "teacher")
    assert resp.status_code == 400
    assert resp.content == body


@pytest.mark.parametrize(
    ("content", "passed"),
    [
        (b'{"error": {"message": "m"}}', True),
        (b'{"error": {"message": "m", "code": 7}, "extra": 1}', True),
        (b'{"error": {"message": null}}', False),
        (b'{"error": null}', False),
        (b'{"error": []}', False),
        (b"\xff\xfe", False),
        (b"", False),
    ],
)
def test_upstream_status_body(content: bytes, passed: bool) -> None:
    exc = UpstreamStatus(503, content)
    if passed:
        assert exc.body() == content
    else:
        assert orjson.loads(exc.body()) == {
            "error": {
                "message": "upstream model returned HTTP 503",
                "type": "upstream_error",
                "param": None,
                "code": 503,
            }
        }
