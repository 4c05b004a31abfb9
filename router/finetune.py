"""Fine-tuning lines: one chat example as OpenAI's fine-tuning format or TRL's `messages` format, and
a check of a file against OpenAI's rules for chat fine-tuning data.

Both formats are one JSON object a line with a `messages` list of `{"role", "content"}`
turns that ends with the assistant answer to learn. They differ in what else a line holds:

- `openai`: only `messages`, the key OpenAI's supervised fine-tuning input defines for a
  plain chat example. Assistant turns from the conversation's history carry `"weight": 0`,
  so training learns only the final (teacher) answer and not whatever model wrote the
  history.
- `messages`: the same turns without `weight` (TRL's `SFTTrainer` and most trainers do not
  read it), plus the example's metadata next to them (`family`, `source`, `score`,
  `request_id`, `ts`), which `datasets` loads as extra columns beside `messages`.

`validate_openai` implements the format checks of OpenAI's chat fine-tuning data
preparation (the `Chat_finetuning_data_prep` cookbook) and the message shapes of the API
reference (`FineTuneChatRequestInput`), plus the guide's minimum of 10 examples. It does not
count tokens: the per-example limit depends on the model and needs its tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

__all__ = [
    "FORMATS",
    "MIN_EXAMPLES",
    "FormatError",
    "LineFormat",
    "example_line",
    "validate_openai",
]

LineFormat = Literal["openai", "messages"]
FORMATS: tuple[LineFormat, ...] = ("openai", "messages")

# OpenAI's fine-tuning guide: a training file needs at least this many examples.
MIN_EXAMPLES = 10
# Per line: the keys of `FineTuneChatRequestInput` in the API reference.
_LINE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
# Per role: the keys its message may have (the API reference's fine-tuning message shapes).
_MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "weight", "tool_calls", "function_call", "refusal"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
    "function": frozenset({"role", "content", "name"}),
}


def example_line(turns: list[dict[str, str]], answer: str, fmt: LineFormat, meta: Mapping[str, Any]) -> bytes:
    """One JSONL line (without its newline): the conversation `turns`, then `answer` to learn.

    `turns` hold plain `role`/`content` strings (system, user, assistant); `meta` goes into
    the `messages` format only.
    """
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn["role"], "content": turn["content"]}
        if fmt == "openai" and turn["role"] == "assistant":
            message["weight"] = 0
        messages.append(message)
    messages.append({"role": "assistant", "content": answer})
    line: dict[str, Any] = {"messages": messages}
    if fmt == "messages":
        line.update(meta)
    return orjson.dumps(line)


@dataclass(frozen=True, slots=True)
class FormatError:
    """One broken rule: the 1-based line (0 for the whole file), the rule's name, what is wrong."""

    line: int
    rule: str
    detail: str


def validate_openai(lines: Iterable[str | bytes]) -> list[FormatError]:
    """Every way a JSONL file breaks OpenAI's rules for chat fine-tuning data (empty when none)."""
    errors: list[FormatError] = []
    count = 0
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            errors.append(FormatError(number, "invalid_encoding", f"a JSONL file is UTF-8: {exc.reason}"))
            count += 1
            continue
        if not text.strip():
            errors.append(FormatError(number, "blank_line", "a JSONL file has one example on every line"))
            continue
        count += 1
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            errors.append(FormatError(number, "invalid_json", str(exc)))
            continue
        errors.extend(FormatError(number, rule, detail) for rule, detail in _line_errors(value))
    if count < MIN_EXAMPLES:
        errors.append(
            FormatError(0, "insufficient_examples", f"{count} examples; fine-tuning needs {MIN_EXAMPLES}")
        )
    return errors


def _line_errors(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return [("data_type", "a line must be a JSON object")]
    errors = [("unrecognized_key", f"unknown key {k!r}") for k in value if k not in _LINE_KEYS]
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        return [*errors, ("missing_messages_list", "`messages` must be a non-empty list")]
    for i, message in enumerate(messages):
        errors.extend((rule, f"messages[{i}]: {detail}") for rule, detail in _message_errors(message))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        errors.append(("example_missing_assistant_message", "no message has the role assistant"))
    return errors


def _message_errors(message: Any) -> list[tuple[str, str]]:
    if not isinstance(message, dict):
        return [("data_type", "a message must be a JSON object")]
    role = message.get("role")
    if "role" not in message:
        return [("message_missing_key", "no `role`")]
    allowed = _MESSAGE_KEYS.get(role) if isinstance(role, str) else None
    if allowed is None:
        return [("unrecognized_role", f"role {role!r} is not one of {', '.join(_MESSAGE_KEYS)}")]
    errors = [("message_unrecognized_key", f"unknown key {k!r}") for k in message if k not in allowed]
    calls = role == "assistant" and bool(message.get("tool_calls") or message.get("function_call"))
    content = message.get("content")
    if "content" not in message and not calls:
        errors.append(("message_missing_key", "no `content`"))
    elif not calls and (not isinstance(content, str) or not content):
        errors.append(("missing_content", "`content` must be a non-empty string"))
    elif calls and content is not None and not isinstance(content, str):
        errors.append(("missing_content", "`content` must be a string or null"))
    if "weight" in message:
        weight = message["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            errors.append(("invalid_weight", f"`weight` must be 0 or 1, not {weight!r}"))
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        errors.append(("message_missing_key", "a tool message needs `tool_call_id`"))
    return errors
