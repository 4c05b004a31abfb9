"""What every wire format answers, so the proxy, streaming, cascade and accounting need not know any.

A `WireFormat` is one API as it travels on the wire (OpenAI chat completions, legacy
completions, Responses, Anthropic Messages, embeddings). It knows:

- its request model and client path, and the upstream path below a model's base URL;
- the request's `Prompt`: the text the scorer reads, its size, the capabilities it needs;
- how to read an answer in its shape: well-formed or not, `Answer`, `Usage`;
- how to read a stream in its shape: decode an event, its usage, its end and its errors;
- how an error looks in its shape, as a body and as a stream event.

A format that an upstream may not speak has a `Translation` to chat completions: a pair
of pure functions (request to chat, chat answer back) and a stream translator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import orjson
from pydantic import BaseModel

from router.accounting import Usage
from router.config import ApiName, Capability
from router.errors import GatewayError
from router.quality import Answer

__all__ = [
    "Malformed",
    "Prompt",
    "StreamAnswer",
    "StreamTranslator",
    "Translation",
    "WireFormat",
    "event_json",
]


_FIELDS = (b"event:", b"id:", b"retry:", b":")


class Malformed(Exception):
    """A stream event that is not well-formed SSE carrying an event of its format."""


@dataclass(slots=True)
class Prompt:
    """What routing needs to know of a request, read once by its format."""

    text: str  # what the scorer reads
    chars: int  # characters the upstream reads as text (messages, system, tool schemas)
    images: int = 0  # image inputs, counted per image rather than by their bytes
    needs: frozenset[Capability] = frozenset()
    budget: int = 0  # completion tokens the client allowed (0 when it set no limit)
    json_wanted: bool = False  # the client asked for JSON output
    json_schema: Mapping[str, Any] | None = None  # ... matching this schema
    # The request as chat completions, when the format read it through its translation:
    # a model that does not speak the format is sent this, translated once.
    as_chat: dict[str, Any] | None = None


@dataclass(slots=True)
class StreamAnswer:
    """The answer so far, assembled from stream events (held back, or for shadowing)."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    tools: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: int = 0

    def tool_delta(self, index: Any, name: Any, arguments: Any) -> None:
        """Add a piece of a tool call (name and arguments arrive in parts)."""
        if not isinstance(index, int) or isinstance(index, bool):
            index = 0
        slot = self.tools.setdefault(index, {"name": "", "arguments": ""})
        if isinstance(name, str):
            slot["name"] += name
        if isinstance(arguments, str):
            slot["arguments"] += arguments

    def answer(self, complete: bool) -> Answer:
        """The answer for the quality checks; tool calls only once they are whole."""
        calls = [{"function": t} for t in self.tools.values()] if complete else []
        return Answer("".join(self.text), self.finish_reason, calls, self.logprobs, complete)


class StreamTranslator(Protocol):
    """Turns a chat-completions stream into another format's events, one chunk at a time."""

    def event(self, chunk: dict[str, Any]) -> bytes:
        """The client events for one chat chunk (may be empty)."""
        ...

    def end(self, usage: Usage | None) -> bytes:
        """The closing events once the chat stream ended with `[DONE]`."""
        ...


class Translation(Protocol):
    """A format served by an upstream that only speaks chat completions."""

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The chat-completions request for this format's request (no `model`, no stream options).

        Raises `InvalidRequest` for what chat completions cannot express.
        """
        ...

    def response(self, chat: dict[str, Any], payload: dict[str, Any], model: str) -> dict[str, Any]:
        """This format's answer for a well-formed chat completion."""
        ...

    def stream(self, payload: dict[str, Any], model: str) -> StreamTranslator:
        """A translator for one streamed answer."""
        ...


def _sse_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of one server-sent event; None when it has none.

    Raises Malformed for a line that is neither data nor another SSE field.
    """
    data: list[bytes] = []
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line or line.startswith(_FIELDS):
            continue
        if not line.startswith(b"data:"):
            raise Malformed
        data.append(line[5:].strip())
    if not data:
        return None
    return b"\n".join(data)


def event_json(event: bytes) -> Any:
    """The JSON one server-sent event carries; None for no data or `[DONE]`.

    Raises Malformed for an event that is not SSE or whose data is not JSON (or is `null`,
    which no format sends and which would read as "no data").
    """
    data = _sse_data(event)
    if data is None or data == b"[DONE]":
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Malformed from None
    if obj is None:
        raise Malformed
    return obj


class WireFormat:
    """One API's knowledge; subclasses fill in what their format says."""

    name: ClassVar[ApiName]
    path: ClassVar[str]  # the client's path
    upstream_path: ClassVar[str]  # below a model's base URL
    request_model: ClassVar[type[BaseModel]]
    scored: ClassVar[bool] = True  # embeddings are not routed by score
    # How a model that does not speak this format natively is asked: through chat completions.
    via_chat: ClassVar[Translation | None] = None
    # Whether the error envelope is OpenAI's (`{"error": {"message", "type", "param", "code"}}`).
    openai_errors: ClassVar[bool] = True
    # Whether the gateway can ask an upstream in this format for token logprobs.
    logprobs: ClassVar[bool] = False
    summary: ClassVar[str] = ""  # the endpoint's one-line OpenAPI summary

    def upstream_headers(self, api_key: str | None) -> dict[str, str]:
        """Headers an upstream that speaks this format expects on every request."""
        return {}

    # --- requests -------------------------------------------------------------------------

    def check(self, payload: dict[str, Any]) -> None:
        """Refuse, with `InvalidRequest`, a valid request the gateway does not implement."""

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        """The request's routing facts (payload already validated by `request_model`)."""
        raise NotImplementedError

    def upstream_payload(
        self, payload: dict[str, Any], upstream_model: str, logprobs: bool
    ) -> dict[str, Any]:
        """The body to send a model that speaks this format natively.

        `logprobs`: ask for token logprobs (the low-confidence check needs them).
        """
        out = dict(payload)
        out["model"] = upstream_model
        return out

    def wants_stream(self, payload: Mapping[str, Any]) -> bool:
        """Whether the client asked for a stream."""
        return payload.get("stream") is True

    def wants_usage_event(self, payload: Mapping[str, Any]) -> bool:
        """Whether a usage-only stream event the gateway asked for is the client's too."""
        return True

    # --- answers --------------------------------------------------------------------------

    def well_shaped(self, parsed: Any) -> bool:
        """Whether a non-streaming answer has the types clients and the gateway read."""
        raise NotImplementedError

    def answer(self, parsed: Any) -> Answer:
        """The answer the quality checks read (any JSON is safe here)."""
        raise NotImplementedError

    def usage(self, parsed: Any) -> Usage | None:
        """The tokens an answer reports, when it reports them."""
        raise NotImplementedError

    def strip_logprobs(self, parsed: Any) -> None:
        """Remove the logprobs the gateway asked for and the client did not."""

    # --- streams --------------------------------------------------------------------------

    def decode_event(self, event: bytes) -> Any:
        """The JSON one event carries; None for an event without data (or `[DONE]`).

        Raises Malformed when the event is not SSE, not JSON, or JSON of the wrong shape.
        """
        raise NotImplementedError

    def ends(self, obj: Any, done: bool) -> bool:
        """Whether the stream is complete after this event (`done`: `[DONE]` was seen)."""
        return done

    def stream_error(self, obj: Any) -> bool:
        """Whether the event reports an error instead of carrying the answer."""
        return isinstance(obj, dict) and "error" in obj

    def event_usage(self, obj: Any, so_far: Usage | None) -> Usage | None:
        """The usage known after this event (some formats report it in parts)."""
        found = self.usage(obj)
        return found if found is not None else so_far

    def carries_answer(self, obj: Any) -> bool:
        """Whether the event is part of the answer (not only usage or bookkeeping)."""
        return True

    def feed(self, answer: StreamAnswer, obj: Any) -> None:
        """Add one event to the answer so far (any JSON is safe here)."""
        raise NotImplementedError

    # --- errors on this wire --------------------------------------------------------------

    def error_body(self, exc: GatewayError) -> bytes:
        """The error's body in this format's envelope."""
        return exc.body()

    def error_event(self, message: str, type_: str) -> bytes:
        """An error as the last event of a stream that has started."""
        return (
            b"data: "
            + orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}})
            + b"\n\n"
        )
