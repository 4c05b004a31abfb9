"""The scorer interface every complexity classifier implements."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

# A system prompt shapes the task but is often boilerplate shared by every
# request of an app, so it counts once, after the user turns, and is capped.
_SYSTEM_CHARS = 2_000
# The last user turn carries the actual ask; earlier turns only add context.
# Scoring cost grows with text length, so older turns are capped too.
_HISTORY_CHARS = 4_000


def _content_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text a scorer reads: the last user turn, earlier user turns, then system text.

    Assistant and tool turns are left out: they are model output, not the ask.
    """
    users: list[str] = []
    systems: list[str] = []
    for message in messages:
        role = message.get("role")
        text = _content_text(message.get("content"))
        if not text:
            continue
        if role == "user":
            users.append(text)
        elif role in ("system", "developer"):
            systems.append(text)
    if not users and not systems:
        return ""
    last = users[-1] if users else ""
    history = "\n".join(users[:-1])[-_HISTORY_CHARS:]
    system = "\n".join(systems)[:_SYSTEM_CHARS]
    return "\n".join(t for t in (last, history, system) if t)


@runtime_checkable
class Scorer(Protocol):
    """Scores a request: the probability in [0, 1] that it needs the teacher."""

    name: str

    def score_text(self, text: str) -> float:
        """Score already-extracted prompt text."""
        ...

    def score(self, messages: Sequence[Mapping[str, Any]]) -> float:
        """Score an OpenAI `messages` list (higher = more likely to need the teacher)."""
        ...


class TextScorer:
    """Mixin: derives `score(messages)` and `score_many` from `score_text`."""

    name = "text"

    def score_text(self, text: str) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def score(self, messages: Sequence[Mapping[str, Any]]) -> float:
        """Score an OpenAI `messages` list."""
        return self.score_text(prompt_text(messages))

    def score_many(self, texts: Iterable[str]) -> list[float]:
        """Score many texts; subclasses may vectorise."""
        return [self.score_text(t) for t in texts]
