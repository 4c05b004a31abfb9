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

Mode = Literal["ok", "status", "slow", "cut_stream", "no_done", "malformed", "no_usage", "stream_error"]


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
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Back to a well-behaved server with no history."""
        fresh = FakeState(self.name)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    @property
    def completion_tokens(self) -> int:
        return self.chunks


def _words(state: FakeState) -> list[str]:
    return [f"{state.name}-{i} " for i in range(state.chunks)]


def make_fake(state: FakeState) -> Starlette:
    """Build the fake server app around a mutable state."""

    async def completion(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        chat = request.url.path.endswith("/chat/completions")
        if state.mode == "status":
            return JSONResponse(
                {"error": {"message": f"{state.name} failed", "type": "server_error",
                           "param": None, "code": state.status}},
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
        text = "".join(_words(state))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        answer: dict[str, Any] = {
            "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": 1700000000, "model": body.get("model"), "choices": [choice],
        }
        if state.mode != "no_usage":
            answer["usage"] = usage
        return JSONResponse(answer)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": state.name, "object": "model"}]})

    return Starlette(routes=[
        Route("/v1/chat/completions", completion, methods=["POST"]),
        Route("/v1/completions", completion, methods=["POST"]),
        Route("/v1/models", models),
    ])


def _chunk(body: dict[str, Any], chat: bool, text: str | None, finish: str | None) -> bytes:
    if chat:
        delta = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    data = {"id": "chunk-fake", "object": obj, "created": 1700000000,
            "model": body.get("model"), "choices": [choice]}
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    state: FakeState, body: dict[str, Any], chat: bool, usage: dict[str, int]
) -> AsyncIterator[bytes]:
    if state.mode == "stream_error":
        yield b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
        return
    words = _words(state)
    for i, word in enumerate(words):
        if state.mode == "cut_stream" and i == len(words) // 2:
            raise RuntimeError("fake upstream dies mid-stream")
        yield _chunk(body, chat, word, None)
        if state.chunk_delay_s:
            await asyncio.sleep(state.chunk_delay_s)
    yield _chunk(body, chat, None, "stop")
    if state.mode == "no_done":
        return
    options = body.get("stream_options") or {}
    if options.get("include_usage") and state.mode != "no_usage":
        final: dict[str, Any] = {"id": "chunk-fake", "object": "chat.completion.chunk", "created": 1700000000,
                 "model": body.get("model"), "choices": [], "usage": usage}
        yield b"data: " + orjson.dumps(final) + b"\n\n"
    yield b"data: [DONE]\n\n"
