"""`triage export --distill`: the teacher's answers in the traffic store, as fine-tuning data.

A stored request gives a teacher answer when its prompt and answer were captured and

- a quality check failed the student's answer and the teacher answered instead (`escalation`),
- a student failed before answering and the request fell back to the teacher (`fallback`),
- the policy routed it to the teacher (`teacher`), or
- a student answered and a shadow call asked the teacher too (`shadow`: the teacher's answer).

Each answer must pass the teacher's own quality checks (`models[teacher].checks`: not
empty, not a refusal, not repetitive), and the conversation must be plain text
(no images, no tool turns, since the file carries no tool definitions). The examples are
de-duplicated on the normalised prompt (the first kept wins), filtered by task family,
score and time, and written one a line in the `openai` or `messages` format
(`router.finetune`). The counts go to stderr: requests read, teacher answers by source,
kept, dropped by reason, kept by family.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from router.config import ModelConfig
from router.finetune import FORMATS, MIN_EXAMPLES, LineFormat, example_line
from router.quality import Answer, check_answer, compile_refusals
from router.records import RequestRecord, ShadowRecord
from router.workload import (
    StoreUnreadable,
    add_store_command,
    load_stored,
    no_requests,
    parse_score,
    request_family,
    stored_traffic,
)

__all__ = ["DistillFilter", "ExportCounts", "add_subcommand", "distill"]

# Words, and each other character that is not a space; prose punctuation is then dropped, so
# "What is 3*2?" and "what is 3 * 2" fold together while "3+2" and "3*2" stay apart.
_TOKENS = re.compile(r"\w+|[^\w\s]")
_PROSE = frozenset(".,;:!?'\"\u201c\u201d\u2018\u2019\u2026")
# Content parts that carry text, in chat and in the Responses API's input.
_TEXT_PARTS = frozenset({"text", "input_text"})


@dataclass(frozen=True, slots=True)
class DistillFilter:
    """Which examples to keep: task families, a score band (inclusive) and a time window."""

    families: frozenset[str] | None = None
    score_min: float | None = None
    score_max: float | None = None
    since: float | None = None
    until: float | None = None


@dataclass(slots=True)
class ExportCounts:
    """What an export read, kept and dropped (and why)."""

    read: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # teacher answers found, by source
    no_answer: Counter[str] = field(default_factory=Counter)  # requests without one, by why
    dropped: Counter[str] = field(default_factory=Counter)
    kept_by_family: Counter[str] = field(default_factory=Counter)
    kept_by_source: Counter[str] = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        """Examples written."""
        return sum(self.kept_by_family.values())

    def render(self) -> list[str]:
        """The counts as the lines `triage export` prints."""
        lines = [
            f"read {self.read:,} requests: {sum(self.answers.values()):,} teacher answers"
            + _breakdown(self.answers)
        ]
        if self.no_answer:
            lines.append(f"  without one: {sum(self.no_answer.values()):,}" + _breakdown(self.no_answer))
        lines.append(f"kept {self.kept:,}, dropped {sum(self.dropped.values()):,}" + _breakdown(self.dropped))
        lines.append("kept by family:" + _breakdown(self.kept_by_family, bare=True))
        lines.append("kept by source:" + _breakdown(self.kept_by_source, bare=True))
        return lines


def _breakdown(counts: Mapping[str, int], bare: bool = False) -> str:
    if not counts:
        return " none" if bare else ""
    parts = ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f" {parts}" if bare else f" ({parts})"


class _NoFormat:
    """The answer's expected form: the store does not keep `response_format`, so JSON is not judged."""

    json_wanted: bool = False
    json_schema: Mapping[str, Any] | None = None


def distill(
    traffic: Iterable[RequestRecord],
    teacher: ModelConfig,
    filters: DistillFilter,
    fmt: LineFormat,
    out: IO[bytes],
) -> ExportCounts:
    """Write the teacher's answers in `traffic` (stored requests with their `shadows`) as JSONL."""
    counts = ExportCounts()
    refusals = compile_refusals(teacher.checks)
    seen: set[str] = set()
    for record in traffic:
        counts.read += 1
        answers = list(_teacher_answers(record, teacher.name))
        if not answers:
            counts.no_answer[_why_none(record, teacher.name)] += 1
            continue
        family = request_family(record)
        for source, text in answers:
            counts.answers[source] += 1
            why, turns = _select(record, family, text, filters, teacher, refusals)
            if turns is None:
                counts.dropped[why] += 1
                continue
            key = _prompt_key(turns)
            if key in seen:
                counts.dropped["duplicate"] += 1
                continue
            seen.add(key)
            meta = {
                "family": family,
                "source": source,
                "score": record.score,
                "request_id": record.request_id,
                "ts": record.ts,
            }
            out.write(example_line(turns, text, fmt, meta) + b"\n")
            counts.kept_by_family[family] += 1
            counts.kept_by_source[source] += 1
    return counts


def _teacher_answers(record: RequestRecord, teacher: str) -> Iterable[tuple[str, str]]:
    """(source, the teacher's text) for each teacher answer the record holds."""
    if record.model == teacher and record.status < 400 and record.answer:
        if record.escalated:
            yield "escalation", record.answer
        elif record.fallback is not None:
            yield "fallback", record.answer
        else:
            yield "teacher", record.answer
    shadows: list[ShadowRecord] = getattr(record, "shadows", [])
    for shadow in shadows:
        if shadow.teacher_answer:
            yield "shadow", shadow.teacher_answer


def _why_none(record: RequestRecord, teacher: str) -> str:
    if record.model is None or record.status >= 400:
        return "failed"
    if not record.captured:
        return "not captured"
    if record.prompt is None and record.messages is None:
        return "text expired"
    if record.model != teacher:
        return "student answer, no shadow"
    return "no answer text"


def _select(
    record: RequestRecord,
    family: str,
    answer: str,
    filters: DistillFilter,
    teacher: ModelConfig,
    refusals: re.Pattern[str],
) -> tuple[str, list[dict[str, str]] | None]:
    """The example's turns, or (why it is dropped, None)."""
    if (filters.since is not None and record.ts < filters.since) or (
        filters.until is not None and record.ts >= filters.until
    ):
        return "time", None
    if filters.families is not None and family not in filters.families:
        return "family", None
    if filters.score_min is not None or filters.score_max is not None:
        score = record.score
        if score is None:
            return "no score", None
        if (filters.score_min is not None and score < filters.score_min) or (
            filters.score_max is not None and score > filters.score_max
        ):
            return "score band", None
    why, turns = _turns(record)
    if turns is None:
        return why, None
    failed = check_answer(Answer(text=answer), teacher.checks, _NoFormat(), refusals)
    if failed is not None:
        return f"check: {failed}", None
    return "", turns


def _turns(record: RequestRecord) -> tuple[str, list[dict[str, str]] | None]:
    """The conversation before the answer as plain-text turns, or (why not, None)."""
    messages = record.messages
    if messages is None:
        if record.api == "completions" and isinstance(record.prompt, str) and record.prompt.strip():
            return "", [{"role": "user", "content": record.prompt}]
        return "no messages", None
    if not isinstance(messages, list):
        return "malformed messages", None
    turns: list[dict[str, str]] = []
    for message in messages:
        if not isinstance(message, dict):
            return "malformed messages", None
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            return "tool turns", None
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            return "unknown role", None
        text = _text(message.get("content"))
        if text is None:
            return "non-text content", None
        if text.strip():
            turns.append({"role": role, "content": text})
    if not any(t["role"] == "user" for t in turns):
        return "no user turn", None
    if turns[-1]["role"] == "assistant":
        return "assistant prefill", None
    return "", turns


def _text(content: Any) -> str | None:
    """A message's content as text; None when it holds anything but text (an image, audio)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            return None
        text = part.get("text")
        texts.append(text if isinstance(text, str) else "")
    return "\n".join(texts)


def _prompt_key(turns: list[dict[str, str]]) -> str:
    """The conversation with case, spacing and prose punctuation folded away (not operators)."""
    return "\n".join(f"{t['role']}:{_folded(t['content'])}" for t in turns)


def _folded(text: str) -> str:
    return " ".join(t for t in _TOKENS.findall(text.lower()) if t not in _PROSE)


def _run(args: argparse.Namespace) -> int:
    config = load_stored(args.config)
    if config is None or config.store is None:
        return 2
    if args.score_min is not None and args.score_max is not None and args.score_min > args.score_max:
        sys.stderr.write(
            f"triage: --score-min ({args.score_min:g}) is above --score-max ({args.score_max:g})\n"
        )
        return 2
    families = frozenset(f.strip() for f in args.family.split(",") if f.strip()) if args.family else None
    filters = DistillFilter(families, args.score_min, args.score_max, args.since, args.until)
    try:
        traffic = stored_traffic(config.store, args.since, args.until)
        if args.out == "-":
            try:
                counts = distill(traffic, config.teacher, filters, args.format, sys.stdout.buffer)
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader left (`| head`): say so once, and keep the interpreter's
                # own flush at exit from failing on the closed pipe again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.stderr.write("triage: the output was closed before the export finished\n")
                return 1
        else:
            try:
                out = Path(args.out).open("wb")
            except OSError as exc:
                sys.stderr.write(f"triage: cannot write {args.out}: {exc.strerror or exc}\n")
                return 2
            with out:
                counts = distill(traffic, config.teacher, filters, args.format, out)
    except StoreUnreadable as exc:
        sys.stderr.write(f"triage: {exc}\n")
        return 2
    if not counts.read:
        sys.stderr.write(f"triage: {no_requests(args.since, args.until)}\n")
        return 1
    where = "stdout" if args.out == "-" else args.out
    lines = [*counts.render(), f"wrote {counts.kept:,} examples to {where} ({args.format} format)"]
    if counts.kept < MIN_EXAMPLES:
        lines.append(f"note: OpenAI fine-tuning needs at least {MIN_EXAMPLES} examples")
    sys.stderr.write("\n".join(lines) + "\n")
    return 0


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `triage export`."""
    from router.__main__ import DEFAULT_CONFIG

    export = add_store_command(
        sub,
        "export",
        "write stored traffic out; --distill: the teacher's answers as fine-tuning JSONL",
        __doc__,
    )
    export.add_argument(
        "--distill",
        action="store_true",
        required=True,
        help="export the teacher answers that passed the checks (the only export so far)",
    )
    export.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the config naming the store")
    export.add_argument("--out", default="-", help="output file (default: stdout; the counts go to stderr)")
    export.add_argument(
        "--format",
        choices=FORMATS,
        default="openai",
        help="openai: only `messages`, history assistant turns weighted 0 (OpenAI fine-tuning); "
        "messages: the turns plus family/source/score metadata (TRL and other trainers)",
    )
    export.add_argument("--family", help="keep only these task families (comma-separated)")
    export.add_argument("--score-min", type=parse_score, help="keep requests scored at least this")
    export.add_argument("--score-max", type=parse_score, help="keep requests scored at most this")
    export.set_defaults(func=_run)
