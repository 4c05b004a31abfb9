"""A fake OpenAI-compatible model server that can be told to misbehave.

It speaks the real protocol (JSON and server-sent events) over real sockets and
answers with its own name, so tests can see which upstream served a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Mode = Literal[
    "ok",
    "status",
    "cut_stream",
    "no_done",
    "malformed",
    "no_usage",
    "stream_error",
    "broken_frame",
    "stall",
    "huge_event",
]


@dataclass
class FakeState:
    """What the fake does next, and what it has seen."""

    name: str
    mode: Mode = "ok"
    status: int = 500
    delay_s: float = 0.0
    chunks: int = 5
    chunk_delay_s: float = 0.0
    prompt_tokens: int = 11
    text: str | None = None  # answer text instead of "<name>-0 <name>-1 …"
    finish_reason: str = "stop"
    logprob: float = -0.05  # per token, when the request asks for logprobs
    tool_calls: list[dict[str, Any]] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Back to a well-behaved server with no history."""
        fresh = FakeState(self.name)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    @property
    def completion_tokens(self) -> int:
        return len(_words(self))


def _words(state: FakeState) -> list[str]:
    if state.text is not None:
        return [w + " " for w in state.text.split(" ")] if state.text else []
    return [f"{state.name}-{i} " for i in range(state.chunks)]


def _logprobs(words: list[str], logprob: float) -> dict[str, Any]:
    return {"content": [{"token": w, "logprob": logprob, "top_logprobs": []} for w in words]}


def make_fake(state: FakeState) -> Starlette:
    """Build the fake server app around a mutable state."""

    async def completion(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        chat = request.url.path.endswith("/chat/completions")
        if state.mode == "status":
            return JSONResponse(
                {
                    "error": {
                        "message": f"{state.name} failed",
                        "type": "server_error",
                        "param": None,
                        "code": state.status,
                    }
                },
                state.status,
                headers={"retry-after": "1"} if state.status == 429 else None,
            )
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.mode == "malformed":
            return Response(b'{"choices": [', media_type="application/json")
        usage = {
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens,
            "total_tokens": state.prompt_tokens + state.completion_tokens,
        }
        if body.get("stream"):
            return StreamingResponse(_stream(state, body, chat, usage), media_type="text/event-stream")
        words = _words(state)
        text = "".join(words).rstrip(" ") if state.text is not None else "".join(words)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": state.finish_reason,
            "logprobs": _logprobs(words, state.logprob) if body.get("logprobs") else None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if state.tool_calls is not None:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": state.tool_calls}
        else:
            choice["text"] = text
        answer: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": 1700000000,
            "model": body.get("model"),
            "choices": [choice],
        }
        if state.mode != "no_usage":
            answer["usage"] = usage
        return JSONResponse(answer)

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        if state.mode == "status":
            return JSONResponse(
                {"error": {"message": f"{state.name} failed", "type": "server_error"}}, state.status
            )
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(i)]}
            for i in range(len(inputs))
        ]
        tokens = sum(len(str(x).split()) for x in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": state.name, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completion, methods=["POST"]),
            Route("/v1/completions", completion, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


def _chunk(
    body: dict[str, Any], chat: bool, text: str | None, finish: str | None, logprob: float = 0.0
) -> bytes:
    if chat:
        delta = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if body.get("logprobs") and text is not None:
            choice["logprobs"] = _logprobs([text], logprob)
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    data = {
        "id": "chunk-fake",
        "object": obj,
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    state: FakeState, body: dict[str, Any], chat: bool, usage: dict[str, int]
) -> AsyncIterator[bytes]:
    if state.mode == "huge_event":
        yield b'data: {"choices": [{"delta": {"content": "'
        for _ in range(80):
            yield b"x" * 65536  # 5 MiB and no end of event
        return
    if state.mode == "stream_error":
        yield b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
        return
    if state.tool_calls is not None and chat:
        for i, call in enumerate(state.tool_calls):
            fn = call["function"]
            head = {"index": i, "id": call.get("id"), "type": "function", "function": {"name": fn["name"]}}
            yield _delta(body, {"tool_calls": [head]})
            args = fn["arguments"]
            for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                yield _delta(body, {"tool_calls": [{"index": i, "function": {"arguments": part}}]})
        yield _chunk(body, chat, None, "tool_calls")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _usage_chunk(body, usage)
        yield b"data: [DONE]\n\n"
        return
    words = _words(state)
    for i, word in enumerate(words):
        if state.mode == "cut_stream" and i == len(words) // 2:
            raise RuntimeError("fake upstream dies mid-stream")
        if state.mode == "broken_frame" and i == len(words) // 2:
            yield b'data: {"id": "chunk-fake", "choices": [{"delta": {"content": "x\n\n'
        if state.mode == "stall" and i == len(words) // 2:
            await asyncio.sleep(5)
        yield _chunk(body, chat, word, None, state.logprob)
        if state.chunk_delay_s:
            await asyncio.sleep(state.chunk_delay_s)
    yield _chunk(body, chat, None, state.finish_reason)
    if state.mode == "no_done":
        return
    options = body.get("stream_options") or {}
    if options.get("include_usage") and state.mode != "no_usage":
        yield _usage_chunk(body, usage)
    yield b"data: [DONE]\n\n"


def _usage_chunk(body: dict[str, Any], usage: dict[str, int]) -> bytes:
    final: dict[str, Any] = {
        "id": "chunk-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(final) + b"\n\n"


def _delta(body: dict[str, Any], delta: dict[str, Any]) -> bytes:
    data = {
        "id": "chunk-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(data) + b"\n\n"
