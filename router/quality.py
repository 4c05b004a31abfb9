"""Cheap checks on a student's answer; a failed check names the reason to escalate to the teacher.

Each check reads the answer text (and logprobs when asked for) and returns a
reason string or None. They run on the whole answer for non-streaming requests
and on the held-back prefix of a stream; checks that need the whole answer
(JSON validity) only judge a stream that ended inside the hold-back window.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from router.config import QualityChecks

__all__ = [
    "Expected",
    "Answer",
    "answer_from_body",
    "check_answer",
    "input_rejection",
    "logprob_values",
    "wants_json",
]

# Compiled once: refusals and "I don't know" openings seen from small chat models.
DEFAULT_REFUSALS = (
    r"^\s*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i)",
    r"^\s*(?:i|we) (?:can(?:no|')t|am unable to|'m unable to|am not able to)"
    r" (?:help|assist|answer|provide|do)",
    r"^\s*as an ai(?: language model)?,? i (?:can(?:no|')t|don'?t)",
    r"\bi (?:don'?t|do not) know\b",
    r"^\s*i'?m not sure\b",
)


@dataclass(slots=True)
class Answer:
    """What the checks look at: the first choice's text, finish reason, tool calls, logprobs."""

    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    complete: bool = True  # False for a held-back prefix of a stream


def answer_from_body(parsed: Any) -> Answer:
    """The first choice of a non-streaming chat or text completion.

    Any JSON is safe here: a field of the wrong type reads as absent.
    """
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    choice: dict[str, Any] = first if isinstance(first, dict) else {}
    message = choice.get("message")
    if isinstance(message, dict):
        text = message.get("content")
        calls = message.get("tool_calls")
    else:
        text = choice.get("text")
        calls = None
    finish = choice.get("finish_reason")
    return Answer(
        text=text if isinstance(text, str) else "",
        finish_reason=finish if isinstance(finish, str) else None,
        tool_calls=calls if isinstance(calls, list) else [],
        logprobs=_logprobs(choice.get("logprobs")),
    )


def _logprobs(obj: Any) -> list[float]:
    if not isinstance(obj, dict):
        return []
    content = obj.get("content")
    if isinstance(content, list):  # chat
        return logprob_values(content)
    tokens = obj.get("token_logprobs")  # legacy completions
    return _numbers(tokens) if isinstance(tokens, list) else []


def logprob_values(tokens: list[Any]) -> list[float]:
    """The `logprob` of each token object in a list (chat's `logprobs.content`)."""
    return _numbers([t.get("logprob") for t in tokens if isinstance(t, dict)])


def _numbers(values: list[Any]) -> list[float]:
    # (a bool is not a logprob; an int past float range would overflow the mean)
    return [
        float(v) for v in values if isinstance(v, float | int) and not isinstance(v, bool) and abs(v) < 1e300
    ]


def wants_json(payload: Mapping[str, Any]) -> tuple[bool, Mapping[str, Any] | None]:
    """(the client asked for JSON, the JSON schema if it gave one)."""
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict):
        return False, None
    if fmt.get("type") == "json_object":
        return True, None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return True, schema if isinstance(schema, dict) else None
    return False, None


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _json_reason(text: str, schema: Mapping[str, Any] | None) -> str | None:
    m = _FENCE.match(text)
    try:
        value = orjson.loads(m.group(1) if m else text)
    except orjson.JSONDecodeError:
        return "invalid_json"
    if schema is not None and not _matches(value, schema):
        return "invalid_json"
    return None


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "null": (type(None),),
}


def _matches(value: Any, schema: Mapping[str, Any]) -> bool:
    """A structural subset of JSON Schema: type, required, properties, items, enum."""
    expected = schema.get("type")
    if isinstance(expected, str) and expected in _TYPES:
        if not isinstance(value, _TYPES[expected]):
            return False
        if expected in ("integer", "number") and isinstance(value, bool):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        required = schema.get("required") or []
        if any(k not in value for k in required):
            return False
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key in value and isinstance(sub, dict) and not _matches(value[key], sub):
                return False
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return all(_matches(v, schema["items"]) for v in value)
    return True


def _tool_call_reason(calls: list[Any]) -> str | None:
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return "tool_call"
        args = fn.get("arguments")
        if not isinstance(args, str):
            return "tool_call"
        try:
            orjson.loads(args or "{}")
        except orjson.JSONDecodeError:
            return "tool_call"
    return None


def _repeats(text: str, ngram: int, max_ratio: float) -> bool:
    words = text.split()
    if len(words) < ngram * 4:
        return False
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    unique = len(set(grams))
    return 1 - unique / len(grams) > max_ratio


class Expected(Protocol):
    """What the request asked of the answer's form (`router.endpoints.Prompt` is one)."""

    json_wanted: bool
    json_schema: Mapping[str, Any] | None


def check_answer(
    answer: Answer, checks: QualityChecks, expected: Expected, refusals: re.Pattern[str]
) -> str | None:
    """The first failed check's reason, or None when the answer looks acceptable."""
    text = answer.text
    stripped = text.strip()
    if checks.tool_calls and answer.tool_calls:
        reason = _tool_call_reason(answer.tool_calls)
        if reason:
            return reason
        return None  # a well-formed tool call is a whole answer without text
    if checks.empty and answer.complete and not stripped:
        return "empty"
    if (
        checks.length_min_chars
        and answer.finish_reason == "length"
        and len(stripped) < checks.length_min_chars
    ):
        return "length"
    if checks.refusal and stripped and refusals.search(stripped[:400]):
        return "refusal"
    if checks.json_format and answer.complete and expected.json_wanted:
        reason = _json_reason(stripped, expected.json_schema)
        if reason:
            return reason
    if checks.min_mean_logprob is not None and answer.logprobs:
        mean = sum(answer.logprobs) / len(answer.logprobs)
        if mean < checks.min_mean_logprob:
            return "low_confidence"
    if checks.repetition_max_ratio is not None and _repeats(
        text, checks.repetition_ngram, checks.repetition_max_ratio
    ):
        return "repetition"
    return None


def compile_refusals(checks: QualityChecks) -> re.Pattern[str]:
    """One regex for the configured refusal patterns (or the defaults)."""
    patterns = checks.refusal_patterns or list(DEFAULT_REFUSALS)
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.MULTILINE)


# A student's own 400 (or 413/422) that says the request does not fit it is not the
# client's fault: the teacher may well take it. Matched against the error body's text,
# case-insensitively; these are the phrasings vLLM, llama.cpp, OpenAI and Anthropic use.
# Anything else stays the client's error and is passed on.
INPUT_REJECTIONS: tuple[tuple[str, str], ...] = (
    (
        "context_length",
        r"context[ _-]?(?:length|window|size)|maximum context|max_model_len|too many tokens"
        r"|prompt is too long|input is too long|exceeds? the (?:model'?s? )?(?:limit|maximum)"
        r"|longer than the model|n_ctx",
    ),
    (
        "unsupported_input",
        r"image input|images? (?:are|is) not supported|not a multimodal|multimodal|vision"
        r"|modality|does not support (?:images?|tools?|tool calls|function calling)"
        r"|tool choice requires|enable-auto-tool-choice|tools? (?:are|is) not supported",
    ),
)
_REJECTIONS = tuple((reason, re.compile(p, re.IGNORECASE)) for reason, p in INPUT_REJECTIONS)
_REJECTABLE = (400, 413, 422)


def input_rejection(status: int, content: bytes) -> str | None:
    """The fallback reason when an upstream's error says the input does not fit the model."""
    if status not in _REJECTABLE:
        return None
    text = content[:4096].decode("utf-8", "replace")
    for reason, pattern in _REJECTIONS:
        if pattern.search(text):
            return reason
    return None
