"""Limits on what an upstream can make the gateway do: stream parsing cost, answer size, redirects, shapes.

A misbehaving or hostile upstream must end in a fallback or a clean error, never
in a 500, a stalled event loop, unbounded memory, or the prompt sent elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx2 as httpx
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from router.accounting import usage_from_body
from router.config import QualityChecks
from router.endpoints import FORMATS, Prompt
from router.endpoints.base import Malformed, StreamAnswer
from router.errors import UpstreamUnavailable
from router.protocol import chunk_well_shaped as _well_shaped
from router.quality import answer_from_body, check_answer, compile_refusals
from router.sse import MAX_EVENT_BYTES, SSEStream
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import serve, triage_process
from tests.router.test_streaming import stream_events, text_of

Handler = Callable[[Request], Awaitable[Response]]


def upstream_app(handler: Handler, seen: list[dict[str, Any]] | None = None) -> Starlette:
    """An OpenAI-style upstream whose completion endpoint is `handler`; bodies go to `seen`."""

    async def completion(request: Request) -> Response:
        if seen is not None:
            seen.append(await request.json())
        return await handler(request)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completion, methods=["POST"]),
            Route("/v1/completions", completion, methods=["POST"]),
        ]
    )


def chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    obj = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def completion_json(text: str = "student answer") -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def ask(gw: Gateway, **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)


def student_at(urls: dict[str, str], url: str, **model: Any) -> dict[str, Any]:
    """The standard config with student-small (the one "hi" is routed to) at `url`."""
    raw = base_config(urls)
    raw["models"][0]["endpoints"] = [url + "/v1"]
    raw["models"][0].update(model)
    return raw


def errors(gw: Gateway, type_: str, model: str = "student-small") -> float:
    return gw.metric("triage_upstream_errors_total", {"model": model, "type": type_})


# --- (3) stream parsing: linear, and the event loop keeps turning ------------------------------


class _Body:
    """Hands a body over in the given reads without waiting, as a fast socket would."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = iter(reads)
        self._eof = False

    async def readany(self) -> bytes:
        read = next(self._reads, b"")
        self._eof = not read
        return read

    def at_eof(self) -> bool:
        return self._eof


class _Response:
    def __init__(self, reads: list[bytes]) -> None:
        self.content = _Body(reads)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


async def split(reads: list[bytes], max_bytes: int = 1 << 40) -> tuple[list[bytes], bool]:
    stream = SSEStream(cast(aiohttp.ClientResponse, _Response(reads)), "m", max_bytes=max_bytes)
    events: list[bytes] = []
    while True:
        stream.buffered()
        event = await stream.next_event()
        if event is None:
            return events, stream.done
        events.append(event)


def reference_split(reads: list[bytes]) -> tuple[list[bytes], bool]:
    """The splitter before this change (quadratic, but its output is the specification)."""
    events: list[bytes] = []
    done = False
    buffer = b""
    pending = iter(reads)
    while True:
        i, j = buffer.find(b"\n\n"), buffer.find(b"\r\n\r\n")
        cut = j if i < 0 else i if j < 0 else min(i, j)
        if cut >= 0:
            event, buffer = buffer[:cut], buffer[cut:].lstrip(b"\r\n")
            done = done or event.startswith((b"data: [DONE]", b"data:[DONE]"))
            events.append(event + b"\n\n")
            continue
        read = next(pending, b"")
        if not read:
            tail = buffer.strip()
            if tail:
                done = done or tail.startswith((b"data: [DONE]", b"data:[DONE]"))
                events.append(tail + b"\n\n")
            return events, done
        buffer += read


_PIECES = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"{}",
        b"x",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b"[DONE]",
        b": ping",
        b"event: e",
        b" ",
        b"\t",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=40), st.lists(st.integers(1, 12), min_size=1, max_size=40))
def test_split_matches_the_old_splitter_however_the_body_is_cut(pieces: list[bytes], cuts: list[int]) -> None:
    body = b"".join(pieces)
    reads = []
    at = 0
    for n in cuts * (len(body) + 1):
        if at >= len(body):
            break
        reads.append(body[at : at + n])
        at += n
    assert asyncio.run(split(reads)) == reference_split(reads)


def test_split_keeps_the_wire_forms() -> None:
    body = b"data: a\n\ndata: b\r\n\r\n\n\n: ping\ndata: c\n\ndata: [DONE]\n\ntrailing"
    events, done = asyncio.run(split([body]))
    assert events == [
        b"data: a\n\n",
        b"data: b\n\n",
        b": ping\ndata: c\n\n",
        b"data: [DONE]\n\n",
        b"trailing\n\n",
    ]
    assert done
    # Cut anywhere, the events are the same but for line breaks between them.
    for size in (1, 2, 3, 7):
        reads = [body[i : i + size] for i in range(0, len(body), size)]
        cut, done = asyncio.run(split(reads))
        assert [e.lstrip(b"\r\n") for e in cut if e.strip()] == events
        assert done


def typical_body(n: int) -> bytes:
    return b"".join(chunk(f" tok{i % 1000}") for i in range(n)) + b"data: [DONE]\n\n"


def test_parsing_cost_is_linear_in_the_burst() -> None:
    # 400k tiny events in one read: the old splitter copied the rest of the buffer
    # for every event and took minutes.
    tiny = b"data: x\n\n" * 400_000
    start = time.process_time()
    events, _ = asyncio.run(split([tiny]))
    assert len(events) == 400_000
    assert time.process_time() - start < 5
    # Per event, a burst of 20k typical chunks costs about what 2k cost.
    costs = []
    for n in (2_000, 20_000):
        body = typical_body(n)
        start = time.process_time()
        asyncio.run(split([body]))
        costs.append((time.process_time() - start) / n)
    assert costs[1] < 4 * costs[0], costs


def test_a_burst_lets_other_tasks_run() -> None:
    body = typical_body(40_000)  # about 7 MB, handed over in one read

    async def run() -> float:
        stall = 0.0
        done = False

        async def ticker() -> None:
            nonlocal stall
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0)
                now = time.perf_counter()
                stall = max(stall, now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        events, finished = await split([body])
        done = True
        await task
        assert finished and len(events) == 40_001
        return stall

    assert asyncio.run(run()) < 0.1


def test_a_stream_event_that_never_ends_is_bounded() -> None:
    reads = [b'data: {"x": "'] + [b"y" * 65536] * (MAX_EVENT_BYTES // 65536 + 2)
    with pytest.raises(UpstreamUnavailable, match="stream event over"):
        asyncio.run(split(reads))
    # Many whole events in one large read are fine.
    events, _ = asyncio.run(split([b"data: {}\n\n" * (MAX_EVENT_BYTES // 5)]))
    assert len(events) == MAX_EVENT_BYTES // 5


def _burst_upstream() -> Starlette:
    body = typical_body(38_000)
    assert len(body) > 7_000_000

    async def handler(request: Request) -> Response:
        async def one_write() -> AsyncIterator[bytes]:
            yield body

        return StreamingResponse(one_write(), media_type="text/event-stream")

    return upstream_app(handler)


def test_7mb_burst_through_the_gateway_keeps_it_responsive(upstreams: Upstreams, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    with serve(_burst_upstream()) as burst:
        cfg.write_text(yaml.safe_dump(student_at(upstreams.urls, burst)))
        with triage_process(cfg) as served, httpx.Client(base_url=served.url, timeout=30) as health:
            for _ in range(3):
                health.get("/healthz")  # connection and first-request costs out of the way
            delays: list[float] = []
            finished = threading.Event()

            def poll() -> None:
                while not finished.is_set():
                    t = time.perf_counter()
                    assert health.get("/healthz").status_code == 200
                    delays.append(time.perf_counter() - t)
                    time.sleep(0.01)

            poller = threading.Thread(target=poll)
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            start = time.perf_counter()
            poller.start()
            try:
                with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as resp:
                    received = b"".join(resp.iter_bytes())
            finally:
                finished.set()
                poller.join()
            elapsed = time.perf_counter() - start
    assert resp.headers["x-triage-model"] == "student-small"
    assert received.endswith(b"data: [DONE]\n\n")
    assert received.count(b"\n\n") == 38_001
    # The old splitter took many seconds of CPU here and /healthz waited for it.
    assert elapsed < 3, elapsed
    assert len(delays) >= 5
    assert max(delays) < 0.25, sorted(delays)[-5:]


# --- (6) answer size, after decompression --------------------------------------------------------


@functools.cache
def gzip_bomb() -> bytes:
    """128 MiB of zeros, gzip-compressed to about 0.6 MB."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(128)), packer.flush()])


def _peak_rss_reset() -> int:
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current size.
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss()


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_answer_over_the_cap_falls_back(
    upstreams: Upstreams, make_gateway: GatewayFactory, framing: str
) -> None:
    big = orjson.dumps(completion_json("x" * (2 << 20)))

    async def handler(request: Request) -> Response:
        if framing == "content-length":
            return Response(big, media_type="application/json")

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        return StreamingResponse(pieces(), media_type="application/json")

    with (
        serve(upstream_app(handler)) as url,
        make_gateway(student_at(upstreams.urls, url, max_response_bytes=1 << 20)) as gw,
    ):
        resp = ask(gw)
        assert resp.status_code == 200
        assert resp.headers["x-triage-model"] == "teacher"
        assert resp.headers["x-triage-fallback"] == "upstream_error"
        assert errors(gw, "too_large") == 1


def test_gzip_bomb_is_cut_off_at_the_cap(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    bomb = gzip_bomb()

    async def handler(request: Request) -> Response:
        return Response(bomb, media_type="application/json", headers={"content-encoding": "gzip"})

    with (
        serve(upstream_app(handler)) as url,
        make_gateway(student_at(upstreams.urls, url, max_response_bytes=1 << 20)) as gw,
    ):
        ask(gw)  # warm up: imports, connections
        before = _peak_rss_reset()
        start = time.perf_counter()
        resp = ask(gw)
        elapsed = time.perf_counter() - start
        grew = _peak_rss() - before
        assert resp.headers["x-triage-model"] == "teacher"
        assert errors(gw, "too_large") == 2
    # Before: the whole 128 MiB was inflated (twice over, by the join) before any check.
    assert grew < 48 << 20, grew
    assert elapsed < 2, elapsed


def test_compressed_answer_under_the_cap_is_served(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    text = " ".join(f"w{i}" for i in range(50_000))  # about 340 kB, compressed to a third
    body = orjson.dumps(completion_json(text))

    async def handler(request: Request) -> Response:
        return Response(
            zlib.compress(body, wbits=31), media_type="application/json", headers={"content-encoding": "gzip"}
        )

    with (
        serve(upstream_app(handler)) as url,
        make_gateway(student_at(upstreams.urls, url, max_response_bytes=1 << 20)) as gw,
    ):
        resp = ask(gw)
        assert resp.headers["x-triage-model"] == "student-small"
        assert resp.json()["choices"][0]["message"]["content"] == text


def _sized_stream(events: int, size: int, pause_after: int) -> Handler:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(events):
                yield chunk(f"w{i} " + "x" * size)
                if i == pause_after:
                    await asyncio.sleep(0.1)
            yield chunk(None, "stop") + b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return handler


def test_stream_over_the_cap(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    # Over the cap inside the hold-back window: nothing was sent, the teacher answers.
    with (
        serve(upstream_app(_sized_stream(20, 1000, 100))) as url,
        make_gateway(student_at(upstreams.urls, url, max_response_bytes=4096)) as gw,
    ):
        resp, events = stream_events(gw)
        assert resp.headers["x-triage-model"] == "teacher"
        assert text_of(events).startswith("teacher-0")
        assert errors(gw, "too_large") == 1
    # Over the cap after the window: the client's stream ends with an error event.
    with (
        serve(upstream_app(_sized_stream(200, 1000, 10))) as url,
        make_gateway(student_at(upstreams.urls, url, max_response_bytes=64 << 10)) as gw,
    ):
        resp, events = stream_events(gw)
        assert resp.headers["x-triage-model"] == "student-small"
        assert events[-1]["error"]["type"] == "upstream_error"
        assert "65536 bytes" in events[-1]["error"]["message"]
        assert "[DONE]" not in events
        assert errors(gw, "too_large") == 1


# --- (7) redirects are never followed ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_redirect_is_an_upstream_error_and_never_followed(
    upstreams: Upstreams, make_gateway: GatewayFactory, stream: bool
) -> None:
    elsewhere: list[dict[str, Any]] = []

    async def answer(request: Request) -> Response:
        return JSONResponse(completion_json("from elsewhere"))

    with serve(upstream_app(answer, elsewhere)) as other:

        async def redirect(request: Request) -> Response:
            return RedirectResponse(other + "/v1/chat/completions", status_code=307)

        with serve(upstream_app(redirect)) as url, make_gateway(student_at(upstreams.urls, url)) as gw:
            if stream:
                resp, events = stream_events(gw)
                assert text_of(events).startswith("teacher-0")
            else:
                resp = ask(gw)
            assert resp.headers["x-triage-model"] == "teacher"
            assert resp.headers["x-triage-fallback"] == "upstream_error"
            assert errors(gw, "redirect") == 1
    assert elsewhere == []  # the prompt went nowhere else


# --- (7) stream events of the wrong shape --------------------------------------------------------

WRONG_SHAPES = [
    b"5",
    b"null",
    b'"text"',
    b"[1, 2]",
    b'{"choices": 5}',
    b'{"choices": [5]}',
    b'{"choices": {"0": {}}}',
    b'{"choices": [{"delta": "x"}]}',
    b'{"choices": [{"delta": {"content": 5}}]}',
    b'{"choices": [{"text": ["a"]}]}',
    b'{"choices": [{"finish_reason": 7}]}',
    b'{"choices": [{"logprobs": []}]}',
    b'{"choices": [{"delta": {"tool_calls": {"index": 0}}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"index": "a"}]}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": 5}}]}}]}',
    b'{"usage": 5, "choices": []}',
    b'{"usage": [], "choices": []}',
]


def _shaped_stream(state: dict[str, Any]) -> Handler:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for i in range(state["good_before"]):
                yield chunk(f"w{i} ")
            await asyncio.sleep(0.05)
            yield b"data: " + state["bad"] + b"\n\n"
            for i in range(3):
                yield chunk(f"v{i} ")
            yield chunk(None, "stop") + b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return handler


def test_wrong_shape_event_falls_back_or_ends_the_stream(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    state: dict[str, Any] = {}
    raw = base_config(upstreams.urls, breaker_failures=1000)
    with serve(upstream_app(_shaped_stream(state))) as url:
        raw["models"][0]["endpoints"] = [url + "/v1"]
        with make_gateway(raw) as gw:
            for n, bad in enumerate(WRONG_SHAPES, 1):
                # First event: nothing sent yet, so the teacher answers (it was a 500 before).
                state.update(bad=bad, good_before=0)
                resp, events = stream_events(gw)
                assert resp.status_code == 200, bad
                assert resp.headers["x-triage-model"] == "teacher", bad
                assert text_of(events).startswith("teacher-0"), bad
                assert errors(gw, "unavailable") == 2 * n - 1, bad
                # After the hold-back window: an error event, never the bad chunk itself.
                state.update(good_before=12)
                resp, events = stream_events(gw)
                assert resp.headers["x-triage-model"] == "student-small", bad
                assert "malformed" in events[-1]["error"]["message"], bad
                assert text_of(events[:-1]) == "".join(f"w{i} " for i in range(12)), bad
                assert errors(gw, "unavailable") == 2 * n, bad


def test_well_shaped_chunks_pass() -> None:
    for raw in (
        chunk("hi"),
        chunk(None, "stop"),
        b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n',
        b'data: {"choices": [{"index": 0, "text": "x", "logprobs": {"tokens": ["x"]}}]}\n\n',
        b'data: {"choices": [{"delta": {"role": "assistant", "content": null, "tool_calls": '
        b'[{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}\n\n',
        b'data: {"error": {"message": "overloaded"}}\n\n',
    ):
        assert isinstance(_CHAT.decode_event(raw), dict), raw


# --- robustness to any JSON ----------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "choices",
        "delta",
        "message",
        "content",
        "text",
        "finish_reason",
        "logprobs",
        "tool_calls",
        "index",
        "function",
        "name",
        "arguments",
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "token_logprobs",
        "logprob",
        "error",
    ]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)
_REFUSALS = compile_refusals(QualityChecks())
_CHAT = FORMATS["chat"]
_ANY = Prompt("", 0)


@settings(max_examples=600, deadline=None)
@given(_JSON, _JSON)
def test_any_json_is_handled_without_crashing(first: Any, second: Any) -> None:
    held = StreamAnswer()
    for value in (first, second):
        _CHAT.feed(held, value)
        usage_from_body(value)
        answer = answer_from_body(value)
        check_answer(answer, QualityChecks(), _ANY, _REFUSALS)
        try:
            obj = _CHAT.decode_event(b"data: " + orjson.dumps(value) + b"\n\n")
        except Malformed:
            assert not _well_shaped(value)
            continue
        if isinstance(obj, dict) and "error" not in obj:
            _CHAT.strip_logprobs(obj)
    for complete in (False, True):
        check_answer(held.answer(complete), QualityChecks(), _ANY, _REFUSALS)


def test_hostile_shapes_that_used_to_raise() -> None:
    held = StreamAnswer()
    _CHAT.feed(held, {"choices": 5})
    _CHAT.feed(held, {"choices": [{"delta": {"tool_calls": [{"index": "a", "function": {"name": 5}}]}}]})
    _CHAT.feed(held, {"choices": [{"finish_reason": ["x"], "logprobs": {"content": [{"logprob": 10**400}]}}]})
    assert held.answer(True).finish_reason is None
    assert answer_from_body({"choices": {"0": 1}}).text == ""
    assert answer_from_body([1]).text == ""
    assert usage_from_body({"usage": {"prompt_tokens": True, "completion_tokens": 1}}) is None
