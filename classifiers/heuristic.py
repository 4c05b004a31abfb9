"""A transparent baseline scorer from length, code, math and multi-step cues."""

from __future__ import annotations

import math
import re

from classifiers.base import TextScorer

_CODE = re.compile(
    r"```|\bdef |\bclass |\bfunction\b|\breturn\b|#include|\bimport |=>|\{\s*$|;\s*$",
    re.MULTILINE,
)
_MATH = re.compile(
    r"\\frac|\\sqrt|\\int|\\sum|\$[^$]+\$|\bprove\b|\btheorem\b|\bintegral\b|\bderivative\b"
    r"|\bequation\b|\bprobability\b|\bmatrix\b|[=<>]\s*-?\d|\d\s*[\^*/]\s*\d",
    re.IGNORECASE,
)
_STEPS = re.compile(
    r"\bstep[- ]by[- ]step\b|\bfirst\b.*\bthen\b|\bexplain why\b|\bderive\b|\banaly[sz]e\b"
    r"|\bcompare\b|\btrade-?offs?\b|\boptimi[sz]e\b|\bdesign\b|\bimplement\b|\bdebug\b",
    re.IGNORECASE | re.DOTALL,
)
_CONSTRAINTS = re.compile(
    r"\bmust\b|\bshould\b|\bexactly\b|\bat least\b|\bat most\b|\bwithout\b|\bonly\b"
    r"|^\s*[-*\d]+[.)]\s",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class HeuristicScorer(TextScorer):
    """Adds up interpretable cues and squashes them to [0, 1] with a logistic."""

    name = "heuristic"

    def score_text(self, text: str) -> float:
        """Score prompt text from length, code, math, steps, constraints and quantities."""
        if not text:
            return 0.0
        # Bound the work per request: cues past this point add little.
        text = text[:20_000]
        words = len(text.split())
        z = -2.2
        z += 0.45 * math.log1p(words / 20)
        z += 0.9 * min(len(_CODE.findall(text)), 3) / 3 * 1.5
        z += 0.8 * min(len(_MATH.findall(text)), 4) / 4 * 1.5
        z += 0.35 * min(len(_STEPS.findall(text)), 4)
        z += 0.15 * min(len(_CONSTRAINTS.findall(text)), 6)
        z += 0.1 * min(len(_NUMBER.findall(text)), 8)
        return 1.0 / (1.0 + math.exp(-z))
