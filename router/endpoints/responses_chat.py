"""The Responses API served by an upstream that only speaks chat completions.

Pure functions, no I/O: `ResponsesViaChat.request` turns a Responses request into a
chat-completions request, `response` turns the chat answer into a Response object, and
`stream` turns chat-completion chunks into the Responses event sequence
(https://platform.openai.com/docs/api-reference/responses-streaming).

What chat completions cannot express (hosted tools such as web search, stored items, files
by id) is not in the request model (`ResponsesRequest` in responses.py), so a client learns
it from the OpenAPI document and a validation error; the refusals below only guard against
a payload that did not pass that model. An input with no message for chat (only reasoning
items, say) is sent on as it is: the upstream decides.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from router.accounting import Usage, usage_from_body
from router.errors import InvalidRequest

__all__ = ["ResponsesStream", "ResponsesViaChat", "chat_request", "chat_response", "response_body"]

# Request fields with no chat-completions meaning that change nothing about the answer
# (bookkeeping, caching hints, storage switches already checked by the format). Sending
# them would make a strict chat upstream refuse the request.
_DROPPED = frozenset(
    {
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "include",
        "max_tool_calls",  # limits hosted tools, which are refused
        "metadata",
        "model",
        "moderation",
        "previous_response_id",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
        "store",
        "stream_options",  # only `include_obfuscation`, which has no chat counterpart
        "top_logprobs",
        # "auto" only matters for a conversation longer than the context, where the
        # upstream then answers with its own error instead of cutting the oldest turns.
        "truncation",
    }
)
# Translated below; everything else (temperature, top_p, parallel_tool_calls, user, and
# sampling extras such as vLLM's top_k or seed) reaches the chat upstream unchanged.
_TRANSLATED = frozenset(
    {"input", "instructions", "tools", "tool_choice", "max_output_tokens", "text", "reasoning", "prompt"}
)
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TOOL_CHOICES = ("auto", "none", "required")


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _refuse(message: str, param: str = "input") -> InvalidRequest:
    return InvalidRequest(message, param=param)


# --- request ---------------------------------------------------------------------------


def _text_of_part(part: dict[str, Any], param: str) -> str:
    text = part.get("text") if part.get("type") != "refusal" else part.get("refusal")
    if not isinstance(text, str):
        raise _refuse(f"`{param}` must be a string.", param)
    return text


def _image_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    url = part.get("image_url")
    if part.get("file_id") is not None or not isinstance(url, str):
        # A file id names an upload stored at OpenAI; there is no file store here.
        raise _refuse(
            "Images must be given as `image_url` (a URL or a data URL); `file_id` is not supported.", param
        )
    image: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if isinstance(detail, str):
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _content(content: Any, role: str, param: str) -> str | list[dict[str, Any]]:
    """A message's content in chat form: assistant and system text as one string, user parts as a list."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"`{param}` must be a string or a list of content parts.", param)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(part, dict):
            raise _refuse(f"`{where}` must be an object.", where)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "refusal"):
            parts.append({"type": "text", "text": _text_of_part(part, where)})
        elif kind == "input_image" and role == "user":
            parts.append(_image_part(part, where))
        else:
            raise _refuse(f"Content part type {kind!r} is not supported in a {role} message.", where)
    if role == "user":
        return parts
    # Chat templates of open models read assistant and system turns as plain strings.
    return "".join(p["text"] for p in parts)


def _tool_output(output: Any, param: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts: list[str] = []
        for i, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                raise _refuse("A function call output may only hold text.", f"{param}[{i}]")
            texts.append(_text_of_part(part, f"{param}[{i}]"))
        return "".join(texts)
    raise _refuse(f"`{param}` must be a string.", param)


def _messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = payload.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _refuse("`instructions` must be a string.", "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    items = payload.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        raise _refuse("`input` must be a string or a list of items.")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _refuse(f"`{param}` must be an object.", param)
        kind = item.get("type")
        if kind is None:  # a message may leave its type out (or send null)
            kind = "message"
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise _refuse(f"`{param}.role` must be one of {', '.join(_MESSAGE_ROLES)}.", param)
            # Open models' chat templates know `system`; `developer` is OpenAI's new name for it.
            chat_role = "system" if role == "developer" else role
            content = _content(item.get("content"), chat_role, f"{param}.content")
            messages.append({"role": chat_role, "content": content})
        elif kind == "function_call":
            call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
                raise _refuse(f"`{param}` needs string `call_id`, `name` and `arguments`.", param)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            # One assistant turn in chat: its text and every call it made, in one message.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise _refuse(f"`{param}.call_id` must be a string.", param)
            output = _tool_output(item.get("output"), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # the model's own reasoning is not read back by chat models
        else:
            raise _refuse(
                f"Input item type {kind!r} is not supported: only messages, function calls and "
                "function call outputs can be sent.",
            )
    return messages


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _refuse("`tools` must be a list.", "tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _refuse(
                f"Tool type {kind!r} is not supported: only function tools are.",
                f"tools[{i}]",
            )
        assert isinstance(tool, dict)
        if not isinstance(tool.get("name"), str):
            raise _refuse("A function tool needs a string `name`.", f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    if choice in _TOOL_CHOICES:
        assert isinstance(choice, str)
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _refuse("`tool_choice` must be auto, none, required or a function.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _refuse("`text` must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise _refuse("`text.format.type` must be text, json_object or json_schema.", "text.format")


def chat_request(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-completions request for a Responses request (no `model`, no stream options)."""
    if payload.get("prompt") is not None:
        raise _refuse("Stored prompt templates (`prompt`) are not supported; send `input`.", "prompt")
    chat: dict[str, Any] = {"messages": _messages(payload)}
    for key, value in payload.items():
        if key not in _DROPPED and key not in _TRANSLATED:
            chat[key] = value
    if payload.get("tools"):
        chat["tools"] = _tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(payload["tool_choice"])
    if payload.get("max_output_tokens") is not None:
        chat["max_tokens"] = payload["max_output_tokens"]
    text = payload.get("text")
    if text is not None:
        fmt = _response_format(text)
        if fmt is not None:
            chat["response_format"] = fmt
        if isinstance(text.get("verbosity"), str):
            chat["verbosity"] = text["verbosity"]
    reasoning = payload.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    return chat


# --- response --------------------------------------------------------------------------


def _whole(value: Any) -> TypeGuard[int]:
    # A bool is not a count, and one past 2**53 is not a real one.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53


def _int(value: Any) -> int:
    # Any JSON is read safely: a count of the wrong type reads as 0.
    return value if _whole(value) else 0


def _usage_body(usage: Usage | None, details: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = reasoning = 0
    if details is not None:
        prompt_details = details.get("prompt_tokens_details")
        if isinstance(prompt_details, dict):
            cached = _int(prompt_details.get("cached_tokens"))
        completion_details = details.get("completion_tokens_details")
        if isinstance(completion_details, dict):
            reasoning = _int(completion_details.get("reasoning_tokens"))
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _echo_tools(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return []
    return [
        {
            "type": "function",
            "name": t.get("name"),
            "description": t.get("description"),
            "parameters": t.get("parameters"),
            "strict": t.get("strict"),
        }
        for t in tools
        if isinstance(t, dict)
    ]


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def response_body(
    payload: Mapping[str, Any],
    *,
    id_: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A whole Response object: the answer plus the request settings it echoes."""
    metadata = payload.get("metadata")
    text = payload.get("text")
    reasoning = payload.get("reasoning")
    choice = payload.get("tool_choice")
    parallel = payload.get("parallel_tool_calls")
    max_output = payload.get("max_output_tokens")
    instructions = payload.get("instructions")
    return {
        "id": id_,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": max_output if isinstance(max_output, int) else None,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "model": model,
        "output": output,
        "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
        "previous_response_id": None,
        "reasoning": reasoning if isinstance(reasoning, dict) else {"effort": None, "summary": None},
        "store": False,
        "temperature": _number(payload.get("temperature")),
        "text": text if isinstance(text, dict) else {"format": {"type": "text"}},
        "tool_choice": choice if isinstance(choice, str | dict) else "auto",
        "tools": _echo_tools(payload),
        "top_p": _number(payload.get("top_p")),
        "truncation": "auto" if payload.get("truncation") == "auto" else "disabled",
        "usage": usage,
        "user": payload.get("user") if isinstance(payload.get("user"), str) else None,
    }


def _message_item(id_: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(id_: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _status(finish_reason: Any) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _created(chat: Mapping[str, Any]) -> int:
    created = chat.get("created")
    return created if _whole(created) and created > 0 else int(time.time())


def chat_response(chat: dict[str, Any], payload: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The Response object for a well-formed chat completion."""
    choices = chat.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    message = message if isinstance(message, dict) else {}
    status = _status(first.get("finish_reason"))
    text = message.get("content")
    text = text if isinstance(text, str) else ""
    calls = message.get("tool_calls")
    calls = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    output: list[dict[str, Any]] = []
    if text or not calls:
        output.append(_message_item(_new_id("msg_"), text, status))
    for call in calls:
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        call_id, name, arguments = call.get("id"), fn.get("name"), fn.get("arguments")
        output.append(
            _call_item(
                _new_id("fc_"),
                call_id if isinstance(call_id, str) else _new_id("call_"),
                name if isinstance(name, str) else "",
                arguments if isinstance(arguments, str) else "",
                "completed",
            )
        )
    answered = chat.get("model")
    usage = chat.get("usage")
    return response_body(
        payload,
        id_=_new_id("resp_"),
        created_at=_created(chat),
        model=answered if isinstance(answered, str) else model,
        status=status,
        output=output,
        usage=_usage_body(usage_from_body(chat), usage if isinstance(usage, dict) else None),
    )


# --- stream ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """A function call being streamed: opened once its name is known."""

    output_index: int = -1  # -1 until `response.output_item.added` went out
    item_id: str = field(default_factory=lambda: _new_id("fc_"))
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    pending: str = ""  # arguments that arrived before the name


@dataclass(slots=True)
class _Message:
    output_index: int
    item_id: str = field(default_factory=lambda: _new_id("msg_"))
    text: str = ""


class ResponsesStream:
    """Turns one chat-completions stream into the Responses event sequence.

    Nothing goes out before the first chunk: `response.created` and
    `response.in_progress` travel with the first chunk's own events.
    """

    def __init__(self, payload: Mapping[str, Any], model: str) -> None:
        self._payload = payload
        self._model = model
        self._id = _new_id("resp_")
        self._created_at = int(time.time())
        self._seq = 0
        self._started = False
        self._output: dict[int, dict[str, Any]] = {}  # closed items by output index
        self._message: _Message | None = None
        self._calls: dict[int, _Call] = {}
        self._finish: str | None = None
        self._usage_details: dict[str, Any] | None = None
        self._chunk_usage: Usage | None = None

    # --- events --------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _next_index(self) -> int:
        opened = [c.output_index for c in self._calls.values()]
        if self._message is not None:
            opened.append(self._message.output_index)
        return max([*self._output, *opened], default=-1) + 1

    def _body(self, status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        return response_body(
            self._payload,
            id_=self._id,
            created_at=self._created_at,
            model=self._model,
            status=status,
            output=[self._output[i] for i in sorted(self._output)],
            usage=usage,
        )

    def _start(self, chunk: Mapping[str, Any]) -> list[bytes]:
        self._started = True
        created = chunk.get("created")
        if _whole(created) and created > 0:
            self._created_at = created
        if isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        body = self._body("in_progress", None)
        return [
            self._event("response.created", response=body),
            self._event("response.in_progress", response=body),
        ]

    def _open_message(self) -> list[bytes]:
        message = self._message = _Message(self._next_index())
        item = _message_item(message.item_id, "", "in_progress")
        item["content"] = []
        return [
            self._event("response.output_item.added", output_index=message.output_index, item=item),
            self._event(
                "response.content_part.added",
                item_id=message.item_id,
                output_index=message.output_index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def _close_message(self, status: str) -> list[bytes]:
        message = self._message
        if message is None:
            return []
        self._message = None
        where = {"item_id": message.item_id, "output_index": message.output_index, "content_index": 0}
        item = _message_item(message.item_id, message.text, status)
        self._output[message.output_index] = item
        return [
            self._event("response.output_text.done", **where, text=message.text, logprobs=[]),
            self._event("response.content_part.done", **where, part=item["content"][0]),
            self._event("response.output_item.done", output_index=message.output_index, item=item),
        ]

    def _text(self, piece: str) -> list[bytes]:
        out = self._open_message() if self._message is None else []
        message = self._message
        assert message is not None
        message.text += piece
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=message.item_id,
                output_index=message.output_index,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        )
        return out

    def _args_delta(self, call: _Call, piece: str) -> bytes:
        call.arguments += piece
        return self._event(
            "response.function_call_arguments.delta",
            item_id=call.item_id,
            output_index=call.output_index,
            delta=piece,
        )

    def _tool_call(self, delta: Mapping[str, Any]) -> list[bytes]:
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = 0
        call = self._calls.setdefault(index, _Call())
        fn = delta.get("function")
        fn = fn if isinstance(fn, dict) else {}
        if isinstance(delta.get("id"), str) and not call.call_id:
            call.call_id = delta["id"]
        if isinstance(fn.get("name"), str) and call.output_index < 0:
            call.name += fn["name"]
        arguments = fn.get("arguments")
        piece = arguments if isinstance(arguments, str) else ""
        out: list[bytes] = []
        if call.output_index < 0:
            if not call.name:
                call.pending += piece  # the item is announced with its name
                return out
            # A message before a call is finished: the call is the next output item.
            out += self._close_message("completed")
            call.output_index = self._next_index()
            call.call_id = call.call_id or _new_id("call_")
            item = _call_item(call.item_id, call.call_id, call.name, "", "in_progress")
            out.append(self._event("response.output_item.added", output_index=call.output_index, item=item))
            piece, call.pending = call.pending + piece, ""
        if piece:
            out.append(self._args_delta(call, piece))
        return out

    # --- StreamTranslator ----------------------------------------------------------

    def event(self, chunk: dict[str, Any]) -> bytes:
        """The Responses events for one chat chunk (the first also opens the response)."""
        out = [] if self._started else self._start(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage_details = usage
            self._chunk_usage = usage_from_body(chunk)
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                out += self._text(content)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._tool_call(call)
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def end(self, usage: Usage | None) -> bytes:
        """Close every open item, then `response.completed` (or `.incomplete`) with the whole response."""
        out = [] if self._started else self._start({})
        status = _status(self._finish)
        if (
            self._message is None
            and not self._output
            and not any(c.output_index >= 0 for c in self._calls.values())
        ):
            out += self._open_message()  # an empty answer is still one (empty) message
        out += self._close_message(status)
        for call in sorted(self._calls.values(), key=lambda c: c.output_index):
            if call.output_index < 0:
                continue  # never named: nothing was announced, nothing to close
            where = {"item_id": call.item_id, "output_index": call.output_index}
            item = _call_item(call.item_id, call.call_id, call.name, call.arguments, "completed")
            self._output[call.output_index] = item
            out.append(
                self._event("response.function_call_arguments.done", **where, arguments=call.arguments)
            )
            out.append(self._event("response.output_item.done", output_index=call.output_index, item=item))
        reported = _usage_body(usage or self._chunk_usage, self._usage_details)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        out.append(self._event(kind, response=self._body(status, reported)))
        return b"".join(out)


class ResponsesViaChat:
    """The Responses API through chat completions (base.py's `Translation`)."""

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The chat-completions request (no `model`, no stream options; `stream` kept)."""
        return chat_request(payload)

    def response(self, chat: dict[str, Any], payload: dict[str, Any], model: str) -> dict[str, Any]:
        """The Response object for a well-formed chat completion."""
        return chat_response(chat, payload, model)

    def stream(self, payload: dict[str, Any], model: str) -> ResponsesStream:
        """A translator for one streamed answer."""
        return ResponsesStream(payload, model)
