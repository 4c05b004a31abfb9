"""Anthropic Messages served by an upstream that only speaks OpenAI chat completions.

Pure functions, no I/O: a Messages request becomes a chat-completions request, a chat
completion becomes a Message, and a chat stream becomes Messages stream events.

Request (https://docs.anthropic.com/en/api/messages) → chat completions:

- `system` (a string or text blocks) → one leading `system` message;
- `text` blocks → text parts; `image` blocks (base64 or URL source) → `image_url` parts;
- assistant `tool_use` blocks → `tool_calls`; user `tool_result` blocks → `tool` messages,
  placed before the rest of their user turn (that is the order the model produced them in);
- `thinking` / `redacted_thinking` blocks are dropped: chat completions has no way to send them back;
- `max_tokens`, `temperature`, `top_p` pass; `stop_sequences` → `stop`; custom `tools` →
  function tools; `tool_choice` → its chat equivalent. `top_k`, `metadata`, `thinking`,
  `service_tier` and any other field have no chat equivalent and are dropped.

What chat completions cannot express (documents, server tools, images in a tool result)
is not in the request model (`router/endpoints/messages.py`), so a client learns it from the
OpenAPI document and a validation error; the refusals below only guard against a payload
that did not pass that model.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from router.accounting import Usage
from router.endpoints.base import StreamTranslator
from router.errors import InvalidRequest

__all__ = ["MessagesStream", "MessagesViaChat", "stop_reason"]

# Chat `finish_reason` → Messages `stop_reason`; anything else (or none) ends the turn.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")


def _hex_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _dict(obj: Any, key: str) -> dict[str, Any]:
    # A field of a parsed answer that should be an object; anything else reads as empty.
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def _first(chat: dict[str, Any]) -> dict[str, Any]:
    choices = chat.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return first if isinstance(first, dict) else {}


def _count(value: Any) -> int:
    # A token count from the upstream's usage; anything that is not one reads as 0.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53:
        return value
    return 0


def stop_reason(finish_reason: Any, tools: bool) -> str:
    """The Messages `stop_reason` for a chat `finish_reason`.

    `tools`: the answer holds tool calls. Some servers end a tool call with `stop`; an
    Anthropic client only runs the tools when the reason is `tool_use`.
    """
    reason = _STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    return "tool_use" if tools and reason == "end_turn" else reason


# --- request ------------------------------------------------------------------------------


def _refuse(message: str, param: str = "messages") -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _refuse("a text block needs a string `text`", param)
    return text


def _system(system: Any) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    texts: list[str] = []
    for block in system:
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else None
            raise _refuse(f"system blocks must be text blocks, not {kind!r}", "system")
        texts.append(_text(block, "system"))
    return "\n".join(texts)


def _image(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict):
        kind = source.get("type")
        if kind == "base64":
            media, data = source.get("media_type"), source.get("data")
            if isinstance(media, str) and isinstance(data, str):
                return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
        elif kind == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _refuse("an image block needs a `source` of type base64 (media_type, data) or url (url)")


def _unsupported(kind: Any, role: str) -> InvalidRequest:
    return _refuse(f"content blocks of type {kind!r} are not supported in {role} messages by this gateway")


def _tool_result(block: dict[str, Any]) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _refuse("a tool_result block needs a string `tool_use_id`")
    content = block.get("content")
    if content is None:  # a tool that returned nothing
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise _refuse(
                    f"tool_result content blocks of type {kind!r} are not supported by this gateway"
                )
            texts.append(_text(part, "messages"))
        text = "\n".join(texts)
    else:
        raise _refuse("a tool_result `content` must be a string or a list of text blocks")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _refuse("a tool_result `is_error` must be a boolean")
    return {"role": "tool", "tool_call_id": call_id, "content": "Error: " + text if is_error else text}


def _tool_use(block: dict[str, Any]) -> dict[str, Any]:
    call_id, name, args = block.get("id"), block.get("name"), block.get("input")
    if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(args, dict)):
        raise _refuse("a tool_use block needs a string `id` and `name` and an object `input`")
    try:
        arguments = orjson.dumps(args).decode()
    except orjson.JSONEncodeError:  # an integer past 64 bits, or nesting past orjson's limit
        raise _refuse("a tool_use `input` could not be encoded as JSON") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _user(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, "messages")})
        elif kind == "image":
            parts.append(_image(block))
        elif kind == "tool_result":
            results.append(_tool_result(block))
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported(kind, "user")
    # A turn of only tool results has nothing more to say; an empty user turn stays one.
    if parts or not results:
        results.append({"role": "user", "content": parts})
    return results


def _assistant(content: Any) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text(block, "messages"))
        elif kind == "tool_use":
            calls.append(_tool_use(block))
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported(kind, "assistant")
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "\n".join(texts) if texts or not calls else None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise _refuse("each tool must be an object", "tools")
        kind = tool.get("type", "custom")
        if kind not in ("custom", None):
            raise _refuse(
                f"only custom tools (name, description, input_schema) are supported, not {kind!r}", "tools"
            )
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise _refuse("a tool needs a string `name` and an object `input_schema`", "tools")
        function: dict[str, Any] = {"name": name}
        if isinstance(description, str):
            function["description"] = description
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _refuse("`tool_choice` must be auto, any, none, or tool with a `name`", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


def _request(payload: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = _system(payload.get("system"))
    if system:  # an empty system prompt says nothing
        messages.append({"role": "system", "content": system})
    for message in payload["messages"]:
        if message["role"] == "user":
            messages.extend(_user(message["content"]))
        else:
            messages.append(_assistant(message["content"]))
    chat: dict[str, Any] = {"messages": messages}
    for key in ("max_tokens", "temperature", "top_p", "stream"):
        if payload.get(key) is not None:
            chat[key] = payload[key]
    if payload.get("stop_sequences"):
        chat["stop"] = payload["stop_sequences"]
    if payload.get("tools"):
        chat["tools"] = _tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        _tool_choice(payload["tool_choice"], chat)
    return chat


# --- answer -------------------------------------------------------------------------------


def _input(arguments: Any) -> dict[str, Any]:
    # A Message's tool input must be an object. Arguments that are not a JSON object
    # (a truncated call cut off by max_tokens, say) become {}: the client still sees the
    # call and its stop reason, and a partial object is not worth more than none.
    if not isinstance(arguments, str):
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = _count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = min(_count(details.get("cached_tokens")), prompt) if isinstance(details, dict) else 0
    # Messages reports cache reads apart from input: the three add up to the prompt.
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _stop(choice: dict[str, Any], payload: dict[str, Any], tools: bool) -> tuple[str, str | None]:
    reason = stop_reason(choice.get("finish_reason"), tools)
    # vLLM names the stop string it matched in `stop_reason`.
    matched = choice.get("stop_reason")
    sequences = payload.get("stop_sequences")
    if (
        reason == "end_turn"
        and isinstance(matched, str)
        and isinstance(sequences, list)
        and matched in sequences
    ):
        return "stop_sequence", matched
    return reason, None


def _response(chat: dict[str, Any], payload: dict[str, Any], model: str) -> dict[str, Any]:
    first = _first(chat)
    message = _dict(first, "message")
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        fn = _dict(call, "function")
        name = fn.get("name")
        call_id = call.get("id")
        content.append(
            {
                "type": "tool_use",
                "id": call_id if isinstance(call_id, str) and call_id else _hex_id("toolu_"),
                "name": name if isinstance(name, str) else "",
                "input": _input(fn.get("arguments")),
            }
        )
    reason, sequence = _stop(first, payload, any(b["type"] == "tool_use" for b in content))
    served = chat.get("model")
    return {
        "id": _hex_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": served if isinstance(served, str) else model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(chat.get("usage")),
    }


# --- stream -------------------------------------------------------------------------------


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class MessagesStream:
    """Chat-completion chunks → Messages stream events, for one answer.

    Messages streams one content block at a time: the text, then each tool call, each
    opened with `content_block_start` and closed with `content_block_stop` when the next
    one starts or the answer ends. Usage arrives in the chat stream's last chunk, so
    `message_start` reports 0 tokens and `message_delta` the real counts.
    """

    def __init__(self, payload: dict[str, Any], model: str) -> None:
        self._payload = payload
        self._model = model
        self._started = False
        self._open: int | None = None  # index of the block now open
        self._kind = ""  # its type: "text" or "tool_use"
        self._blocks = 0
        self._tools: dict[int, int] = {}  # chat tool-call index → block index
        self._finish: Any = None
        self._matched: Any = None

    def _start(self, out: list[bytes], chunk: dict[str, Any] | None) -> None:
        if self._started:
            return
        self._started = True
        served = chunk.get("model") if chunk is not None else None
        message: dict[str, Any] = {
            "id": _hex_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": served if isinstance(served, str) else self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(_sse({"type": "message_start", "message": message}))

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(_sse({"type": "content_block_stop", "index": self._open}))
            self._open = None

    def _begin(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._close(out)
        index = self._open = self._blocks
        self._blocks += 1
        self._kind = block["type"]
        out.append(_sse({"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _text(self, out: list[bytes], text: str) -> None:
        if self._open is None or self._kind != "text":
            self._begin(out, {"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        out.append(_sse({"type": "content_block_delta", "index": self._open, "delta": delta}))

    def _tool(self, out: list[bytes], call: dict[str, Any]) -> None:
        position = call.get("index")
        position = position if isinstance(position, int) and not isinstance(position, bool) else 0
        fn = _dict(call, "function")
        index = self._tools.get(position)
        if index is None:
            call_id, name = call.get("id"), fn.get("name")
            block = {
                "type": "tool_use",
                "id": call_id if isinstance(call_id, str) and call_id else _hex_id("toolu_"),
                "name": name if isinstance(name, str) else "",
                "input": {},
            }
            index = self._tools[position] = self._begin(out, block)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(_sse({"type": "content_block_delta", "index": index, "delta": delta}))

    def event(self, chunk: dict[str, Any]) -> bytes:
        """The Messages events for one chat chunk (the first chunk also opens the message)."""
        out: list[bytes] = []
        self._start(out, chunk)
        choice = _first(chunk)
        delta = _dict(choice, "delta")
        text = delta.get("content")
        if isinstance(text, str) and text:
            self._text(out, text)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool(out, call)
        if choice.get("finish_reason") is not None:
            self._finish = choice.get("finish_reason")
            self._matched = choice.get("stop_reason")
        return b"".join(out)

    def end(self, usage: Usage | None) -> bytes:
        """Close the open block, then `message_delta` (stop reason, usage) and `message_stop`."""
        out: list[bytes] = []
        self._start(out, None)
        self._close(out)
        choice = {"finish_reason": self._finish, "stop_reason": self._matched}
        reason, sequence = _stop(choice, self._payload, bool(self._tools))
        counts = {"output_tokens": 0}
        if usage is not None:
            counts = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out.append(_sse({"type": "message_delta", "delta": delta, "usage": counts}))
        out.append(_sse({"type": "message_stop"}))
        return b"".join(out)


class MessagesViaChat:
    """The Messages ↔ chat-completions `Translation`."""

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The chat-completions request for a Messages request (no `model`, no stream options).

        Raises `InvalidRequest` for what chat completions cannot express.
        """
        return _request(payload)

    def response(self, chat: dict[str, Any], payload: dict[str, Any], model: str) -> dict[str, Any]:
        """The Message for a well-formed chat completion; `model` when the answer names none."""
        return _response(chat, payload, model)

    def stream(self, payload: dict[str, Any], model: str) -> StreamTranslator:
        """A translator for one streamed answer."""
        return MessagesStream(payload, model)
