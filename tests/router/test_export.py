"""`triage export --distill`: which teacher answers become fine-tuning lines, and OpenAI's format rules."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from router.__main__ import main
from router.config import ModelConfig
from router.export import DistillFilter, distill
from router.finetune import validate_openai
from router.records import ShadowRecord
from router.store.schema import StoredRequest
from tests.conftest import GatewayFactory, Upstreams
from tests.router.stored_traffic import ask, serve_and_store

TEACHER = ModelConfig.model_validate(
    {"name": "teacher", "role": "teacher", "endpoints": ["http://127.0.0.1:9/v1"], "upstream_model": "t"}
)


def stored(n: int, question: str, answer: str | None, **fields: Any) -> StoredRequest:
    """Request `rN`, captured, routed to the teacher, which gave `answer`."""
    values: dict[str, Any] = {
        "ts": 1_700_000_000.0 + n,
        "request_id": f"r{n}",
        "key": None,
        "api": "chat",
        "requested": "auto",
        "model": "teacher",
        "attempted": ("teacher",),
        "reason": "classifier",
        "score": 0.7,
        "threshold_factor": 1.0,
        "status": 200,
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.01,
        "teacher_cost_usd": 0.01,
        "latency_ms": 1.0,
        "ttft_ms": None,
        "upstream_ms": 1.0,
        "fallback": None,
        "error": None,
        "quality": None,
        "shadowed": False,
        "captured": True,
        "prompt": question,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        "answer": answer,
    }
    values.update(fields)
    return StoredRequest(**values)


def traffic() -> list[StoredRequest]:
    student = {"model": "student", "attempted": ("student",), "quality": "passed", "score": 0.1}
    shadowed = stored(3, "Thanks! What is 2 + 2?", "4", **student, shadowed=True)
    shadowed.shadows = [ShadowRecord(1.0, "r3", "student", 1.0, "2 + 2 = 4.", 5, 4)]
    history = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "And goodbye?"},
    ]
    tools = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    return [
        stored(1, "What is the capital of France?", "Paris is the capital of France."),
        stored(
            2,
            "Write a python function that reverses a string.",
            "def rev(s):\n    return s[::-1]",
            attempted=("student", "teacher"),
            quality="refusal",
            fallback="refusal",
            score=0.2,
        ),
        shadowed,
        stored(4, "what is the CAPITAL of france", "Paris."),  # the same prompt as r1, folded
        stored(5, "How do I pick a lock?", "I'm sorry, but I can't help with that."),
        stored(6, "Not captured.", None, captured=False, prompt=None, messages=None),
        stored(7, "Weather in Paris?", "Sunny, 21 °C.", messages=tools),
        stored(8, "Describe this image.", "A cat.", messages=image),
        stored(9, "And goodbye?", "Au revoir.", messages=history),
        stored(10, "Hello?", "Hi!", model="student", attempted=("student",), quality="passed"),
        *(stored(20 + i, f"Name a prime number above {10 * i}.", f"{10 * i + 1}?") for i in range(8)),
    ]


def export(fmt: str = "openai", **filters: Any) -> tuple[list[dict[str, Any]], Any, bytes]:
    out = io.BytesIO()
    counts = distill(traffic(), TEACHER, DistillFilter(**filters), fmt, out)  # type: ignore[arg-type]
    data = out.getvalue()
    return [orjson.loads(line) for line in data.splitlines()], counts, data


def test_the_teacher_answers_that_pass_become_lines_in_openais_format() -> None:
    lines, counts, data = export()
    assert validate_openai(data.splitlines()) == []
    assert counts.read == 18
    assert dict(counts.answers) == {"teacher": 14, "escalation": 1, "shadow": 1}
    assert dict(counts.no_answer) == {"not captured": 1, "student answer, no shadow": 1}
    assert dict(counts.dropped) == {
        "duplicate": 1,
        "check: refusal": 1,
        "tool turns": 1,
        "non-text content": 1,
    }
    assert counts.kept == 12
    assert dict(counts.kept_by_source) == {"teacher": 10, "escalation": 1, "shadow": 1}
    # The eight "Name a prime number above N." prompts and "What is 2 + 2?" read as math.
    assert dict(counts.kept_by_family) == {"knowledge": 1, "code": 1, "math": 9, "chat": 1}
    first, escalation, shadow = lines[:3]
    assert first == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    }
    assert escalation["messages"][-1]["content"].startswith("def rev(s):")
    assert shadow["messages"][-1] == {"role": "assistant", "content": "2 + 2 = 4."}
    # History: the developer turn is a system turn, text parts are joined, and the history's
    # assistant turn is not trained on.
    assert lines[3]["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Bonjour.", "weight": 0},
        {"role": "user", "content": "And goodbye?"},
        {"role": "assistant", "content": "Au revoir."},
    ]


def test_the_messages_format_carries_metadata_and_no_weights() -> None:
    lines, counts, data = export("messages")
    assert counts.kept == 12
    history = lines[3]
    assert history["messages"][2] == {"role": "assistant", "content": "Bonjour."}
    assert {k: history[k] for k in ("family", "source", "score", "request_id")} == {
        "family": "chat",
        "source": "teacher",
        "score": 0.7,
        "request_id": "r9",
    }
    # Those extra keys are exactly what OpenAI's format does not allow.
    assert {e.rule for e in validate_openai(data.splitlines())} == {"unrecognized_key"}


def test_filters_by_family_score_and_time() -> None:
    _, counts, _ = export(families=frozenset({"code", "math"}))
    assert dict(counts.kept_by_family) == {"code": 1, "math": 9}
    assert counts.dropped["family"] == 6  # r1, r4, r5, r7, r8, r9
    _, counts, _ = export(score_min=0.15, score_max=0.5)
    assert dict(counts.kept_by_source) == {"escalation": 1}  # scored 0.2; the shadowed r3 0.1
    _, counts, _ = export(since=1_700_000_009.0, until=1_700_000_021.0)
    assert counts.kept == 2 and counts.dropped["time"] == 14  # r9 and r20 kept


USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "x"}


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (b"not json", "invalid_json"),
        (b"[]", "data_type"),
        ({"messages": []}, "missing_messages_list"),
        ({"prompt": "hi", "completion": "there"}, "missing_messages_list"),
        ({"messages": [USER]}, "example_missing_assistant_message"),
        ({"messages": [USER, {"role": "assistant", "content": ""}]}, "missing_content"),
        ({"messages": [{"role": "user", "content": ["hi"]}, ANSWER]}, "missing_content"),
        ({"messages": [{"role": "user"}, ANSWER]}, "message_missing_key"),
        ({"messages": [{"content": "hi"}, ANSWER]}, "message_missing_key"),
        ({"messages": [{"role": "robot", "content": "hi"}, ANSWER]}, "unrecognized_role"),
        ({"messages": [{**USER, "x": 1}, ANSWER]}, "message_unrecognized_key"),
        ({"messages": [USER, {**ANSWER, "weight": 2}]}, "invalid_weight"),
        ({"messages": [{**USER, "weight": 0}, ANSWER]}, "message_unrecognized_key"),
        ({"messages": [{"role": "tool", "content": "hi"}, ANSWER]}, "message_missing_key"),
        ({"messages": [USER, ANSWER], "family": "chat"}, "unrecognized_key"),
        (b"", "blank_line"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_encoding"),  # Latin-1
        (b"\xff\xfe{}", "invalid_encoding"),
    ],
)
def test_the_validator_rejects_each_broken_rule(line: bytes | dict[str, Any], rule: str) -> None:
    good = orjson.dumps({"messages": [USER, ANSWER]})
    errors = validate_openai([*[good] * 10, line if isinstance(line, bytes) else orjson.dumps(line)])
    assert {e.line for e in errors} == {11} and rule in {e.rule for e in errors}


def test_the_validator_accepts_tool_calls_and_wants_ten_examples() -> None:
    call = (
        '{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": '
        '[{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}, '
        '{"role": "tool", "tool_call_id": "c1", "content": "sunny"}, '
        '{"role": "assistant", "content": "Sunny.", "weight": 1}], "tools": []}'
    )
    assert validate_openai([call] * 10) == []
    assert [e.rule for e in validate_openai([call] * 9)] == ["insufficient_examples"]


def test_export_writes_a_gateways_teacher_answers(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def send(client: openai.OpenAI) -> None:
        for i in range(6):  # to the student, then shadowed on the teacher
            ask(client, f"thanks {i}")
        for i in range(6):  # to the teacher
            text = f"Prove that {i} is not the largest integer."
            ask(client, text, **{"x-triage-route": "teacher", "x-triage-family": "proofs"})

    _, config = serve_and_store(upstreams, make_gateway, tmp_path, send, shadows=6)
    out = tmp_path / "distill.jsonl"
    assert main(["export", "--distill", "--config", str(config), "--out", str(out)]) == 0
    report = capsys.readouterr().err
    assert validate_openai(out.read_bytes().splitlines()) == []
    assert "read 12 requests: 12 teacher answers (shadow 6, teacher 6)" in report
    assert "kept 12, dropped 0" in report
    assert "proofs 6" in report
    args = ["export", "--distill", "--config", str(config), "--family", "proofs", "--format", "messages"]
    assert main(args) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6 and {line["family"] for line in lines} == {"proofs"}
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": "the teacher says that"}


ODD_MESSAGES: list[Any] = [
    "a string",
    {"role": "user", "content": "a dict, not a list"},
    [None],
    ["a string"],
    [{"role": None, "content": "no role"}],
    [{"content": "no role at all"}],
    [{"role": "user"}],  # no content
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": {"text": "a dict"}}],
    [{"role": "user", "content": [None]}],
    [{"role": "user", "content": [{"type": "text", "text": None}]}],
    [{"role": "user", "content": "   "}],
    [{"role": ["user"], "content": "a list role"}],
    [{"role": "user", "content": "\u00e9 \u2603 \x00 \U0001d54f and more"}],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "y"},
    ],
]
ODD_ANSWERS = ["", "   ", "\u00e9 \u2603 \x00 \U0001d54f, an answer", "long answer " * 200_000]


def test_odd_stored_content_is_dropped_or_kept_valid_never_a_crash() -> None:
    records = [
        stored(i * 10 + j, f"question {i} {j}", answer, messages=messages, prompt=None)
        for i, messages in enumerate(ODD_MESSAGES)
        for j, answer in enumerate(ODD_ANSWERS)
    ]
    records += [
        stored(900 + i, prompt, "Fine.", messages=None, api="completions")
        for i, prompt in enumerate(["", "  ", "a legacy prompt"])
    ]
    for fmt in ("openai", "messages"):
        out = io.BytesIO()
        counts = distill(records, TEACHER, DistillFilter(), fmt, out)
        assert counts.read == len(records)
        assert counts.kept + sum(counts.dropped.values()) + sum(counts.no_answer.values()) == len(records)
        lines = out.getvalue().splitlines()
        assert len(lines) == counts.kept > 0
        if fmt == "openai":
            assert [e.rule for e in validate_openai(lines)] in ([], ["insufficient_examples"])
    # The four that are not a list of objects, with each answer but the empty one (no answer).
    assert counts.dropped["malformed messages"] == 4 * 3


def test_prompts_that_differ_only_in_an_operator_are_not_duplicates() -> None:
    asked = [
        ("What is 3+2?", "5."),
        ("What is 3*2?", "6."),
        ("what is 3 * 2", "6, again."),  # case, spacing and punctuation fold: a duplicate
        ("Is 3 < 5?", "Yes."),
        ("Is 3 > 5?", "No."),
        ("Fix: a[i] = b", "Use a(i)."),
        ("Fix: a(i) = b", "Use a[i]."),
    ]
    records = [stored(i, question, answer) for i, (question, answer) in enumerate(asked)]
    counts = distill(records, TEACHER, DistillFilter(), "openai", io.BytesIO())
    assert (counts.kept, dict(counts.dropped)) == (6, {"duplicate": 1})
