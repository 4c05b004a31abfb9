"""Pick the score threshold for a wanted student share, and write it into config.yaml.

The gateway sends a request to a student when its score is at or below that student's
`max_score`. A threshold `t` "sends share s to students" on a sample when the fraction of
sample scores <= t is s (up to ties).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

Scores = Sequence[float] | npt.NDArray[np.float64]

_MAX_SCORE_LINE = re.compile(r"^(?P<head>\s*(?:-\s+)?max_score:\s*)(?P<value>[^\s#]+)(?P<tail>.*)$")


def threshold_for_share(scores: Scores, student_share: float) -> float:
    """Threshold that puts `student_share` of `scores` at or below it.

    Between two neighbouring sorted scores the midpoint is returned, so a slightly
    different sample of similar scores still lands near the asked share.
    """
    if not 0.0 <= student_share <= 1.0:
        raise ValueError(f"student share must be in [0, 1], got {student_share}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no scores to calibrate on")
    k = int(round(student_share * len(s)))
    if k == 0:
        return float(max(0.0, np.nextafter(s[0], -np.inf)))
    if k == len(s):
        return 1.0
    return float((s[k - 1] + s[k]) / 2)


def student_share(scores: Scores, threshold: float) -> float:
    """The share of scores a threshold sends to students (score <= threshold)."""
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s <= threshold)) if len(s) else float("nan")


def rewrite_max_scores(path: Path, threshold: float) -> list[tuple[str, float, float]]:
    """Scale every student's `max_score` so the largest equals `threshold`; keep comments.

    Returns (model name, old, new) per student. Only the `max_score:` lines change; the
    file is re-parsed afterwards to check the edit did what was meant.
    """
    text = path.read_text()
    config = yaml.safe_load(text) or {}
    models: list[dict[str, Any]] = config.get("models") or []
    with_max = [m for m in models if isinstance(m, dict) and "max_score" in m]
    students = [m for m in with_max if m.get("role") == "student"]
    if not students:
        raise ValueError(f"{path}: no `models` entry with role: student and a max_score")
    top = max(float(m["max_score"]) for m in students)
    if top <= 0:
        raise ValueError(f"{path}: the largest student max_score is {top}; cannot scale it")
    factor = threshold / top
    new_values = [
        round(float(m["max_score"]) * factor, 6) if m.get("role") == "student" else None for m in with_max
    ]

    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if _MAX_SCORE_LINE.match(line)]
    if len(hits) != len(with_max):
        raise ValueError(
            f"{path}: found {len(hits)} `max_score:` lines for {len(with_max)} models; "
            "edit it by hand (block-style YAML, one `max_score:` per line, is supported)"
        )
    for i, value in zip(hits, new_values, strict=True):
        if value is None:
            continue
        m = _MAX_SCORE_LINE.match(lines[i].rstrip("\r\n"))
        assert m is not None
        newline = lines[i][len(lines[i].rstrip("\r\n")) :]
        lines[i] = f"{m['head']}{value}{m['tail']}{newline}"
    new_text = "".join(lines)

    check = (yaml.safe_load(new_text) or {}).get("models") or []
    got = [float(m["max_score"]) for m in check if m.get("role") == "student" and "max_score" in m]
    want = [v for v in new_values if v is not None]
    if got != want:
        raise ValueError(f"{path}: rewrite check failed (wanted {want}, parsed {got})")
    path.write_text(new_text)
    return [
        (str(m.get("name", "?")), float(m["max_score"]), float(v))
        for m, v in zip(with_max, new_values, strict=True)
        if v is not None
    ]
