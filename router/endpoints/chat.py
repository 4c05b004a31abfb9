"""OpenAI chat completions (`POST /v1/chat/completions`) and legacy completions (`POST /v1/completions`).

These two are the gateway's native formats: every other format can be served by an
upstream that speaks only chat completions, through its `Translation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from classifiers import prompt_text
from router.accounting import Usage, usage_from_body
from router.config import Capability
from router.endpoints.base import Malformed, Prompt, StreamAnswer, WireFormat, event_json
from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    answer_well_shaped,
    chunk_well_shaped,
)
from router.quality import Answer, answer_from_body, logprob_values, wants_json

__all__ = ["ChatFormat", "CompletionsFormat", "chat_prompt"]

# Image parts are counted as images (`routing.image_tokens` each), never by their base64 bytes.
_IMAGE_PARTS = ("image_url", "input_image", "image")


def _content_chars(content: Any) -> tuple[int, int]:
    """(text characters, images) of a message's content."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        return 0, 0
    chars = images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _IMAGE_PARTS:
            images += 1
        elif isinstance(part.get("text"), str):
            chars += len(part["text"])
        else:
            chars += len(orjson.dumps(part))
    return chars, images


def chat_prompt(payload: Mapping[str, Any]) -> Prompt:
    """The routing facts of a chat-completions request (also used for translated formats)."""
    chars = images = 0
    for m in payload["messages"]:
        c, i = _content_chars(m.get("content"))
        chars += c
        images += i
        calls = m.get("tool_calls")
        if calls:
            chars += len(orjson.dumps(calls))
    needs: set[Capability] = set()
    tools = payload.get("tools") or payload.get("functions")
    if tools:
        needs.add("tools")
        chars += len(orjson.dumps(tools))  # the schemas are part of the prompt the model reads
    if images:
        needs.add("vision")
    asked, schema = wants_json(payload)
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        needs.add("json_schema")
    budget = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
    return Prompt(
        text=prompt_text(payload["messages"]),
        chars=chars,
        images=images,
        needs=frozenset(needs),
        budget=budget if isinstance(budget, int) else 0,
        json_wanted=asked,
        json_schema=schema,
    )


def _decode_chunk(event: bytes) -> Any:
    obj = event_json(event)
    if obj is None:
        return None
    if not chunk_well_shaped(obj):
        raise Malformed
    return obj


class _OpenAIFormat(WireFormat):
    """What chat and legacy completions share: usage, streams of `choices`, `[DONE]`."""

    def upstream_payload(
        self, payload: dict[str, Any], upstream_model: str, logprobs: bool
    ) -> dict[str, Any]:
        out = dict(payload)
        out["model"] = upstream_model
        if payload.get("stream") is True:
            # Always ask for usage so tokens and cost are exact; the extra
            # chunk is removed again when the client did not ask for it.
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            out["stream_options"] = options
        if logprobs and not payload.get("logprobs"):
            out["logprobs"] = self._logprobs_on
        return out

    _logprobs_on: Any = True
    logprobs = True

    def wants_usage_event(self, payload: Mapping[str, Any]) -> bool:
        options = payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def answer(self, parsed: Any) -> Answer:
        return answer_from_body(parsed)

    def usage(self, parsed: Any) -> Usage | None:
        return usage_from_body(parsed)

    def strip_logprobs(self, parsed: Any) -> None:
        for choice in parsed.get("choices") or ():
            if isinstance(choice, dict):
                choice.pop("logprobs", None)

    def decode_event(self, event: bytes) -> Any:
        return _decode_chunk(event)

    def carries_answer(self, obj: Any) -> bool:
        return bool(obj.get("choices")) or "usage" not in obj

    def feed(self, answer: StreamAnswer, obj: Any) -> None:
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        answer.events += 1
        choice = choices[0]
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(piece, str):
            answer.text.append(piece)
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            answer.finish_reason = finish
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            answer.logprobs.extend(logprob_values(lp["content"]))
        if isinstance(delta, dict) and isinstance(delta.get("tool_calls"), list):
            for call in delta["tool_calls"]:
                if isinstance(call, dict):
                    fn = call.get("function")
                    fn = fn if isinstance(fn, dict) else {}
                    answer.tool_delta(call.get("index"), fn.get("name"), fn.get("arguments"))


class ChatFormat(_OpenAIFormat):
    """`POST /v1/chat/completions`."""

    name = "chat"
    path = "/v1/chat/completions"
    summary = "Create a chat completion (routed)"
    upstream_path = "/chat/completions"
    request_model = ChatCompletionRequest

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        return chat_prompt(payload)

    def well_shaped(self, parsed: Any) -> bool:
        return answer_well_shaped(parsed, True)


class CompletionsFormat(_OpenAIFormat):
    """`POST /v1/completions` (legacy text completions)."""

    name = "completions"
    path = "/v1/completions"
    summary = "Create a text completion (routed)"
    upstream_path = "/completions"
    request_model = CompletionRequest
    _logprobs_on = 1

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        prompt = payload["prompt"]
        text = prompt if isinstance(prompt, str) else "\n".join(prompt)
        budget = payload.get("max_tokens") or 0
        return Prompt(text=text, chars=len(text), budget=budget if isinstance(budget, int) else 0)

    def well_shaped(self, parsed: Any) -> bool:
        return answer_well_shaped(parsed, False)
