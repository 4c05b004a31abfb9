"""What of a captured request is kept: redaction of emails, API keys and the operator's own patterns.

Redaction runs in the store's writer thread, before anything is written, on every
string a captured record carries: the prompt, each string inside the chat messages
(so the JSON stays valid whatever a pattern matches), the answer and the teacher's
shadow answer.
"""

from __future__ import annotations

import re
from typing import Any

from router.config import CaptureConfig

__all__ = ["EMAIL", "KEY_PATTERNS", "Redactor"]

EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# Secrets that look like API keys and tokens: provider prefixes, bearer tokens, JWTs.
KEY_PATTERNS = (
    r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{16,}",  # OpenAI, Anthropic (sk-ant-...), Stripe
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",  # GitHub
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
    r"(?i)(?<=bearer )[A-Za-z0-9._~+/=-]{16,}",
)


class Redactor:
    """Replaces what `capture` says to hide: `[EMAIL]`, `[KEY]`, `[REDACTED]` (own patterns)."""

    def __init__(self, capture: CaptureConfig) -> None:
        rules: list[tuple[re.Pattern[str], str]] = []
        if capture.redact_keys:
            rules += [(re.compile(p), "[KEY]") for p in KEY_PATTERNS]
        if capture.redact_emails:
            rules.append((re.compile(EMAIL), "[EMAIL]"))
        rules += [(re.compile(p), "[REDACTED]") for p in capture.redact_patterns]
        self._rules = rules

    def text(self, value: str | None) -> str | None:
        """The text with every match replaced."""
        if not value:
            return value
        for pattern, replacement in self._rules:
            value = pattern.sub(replacement, value)
        return value

    def value(self, value: Any) -> Any:
        """A JSON-like value (chat messages) with every string in it redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value
