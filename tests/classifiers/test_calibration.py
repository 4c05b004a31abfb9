"""Threshold choice for a student share, and the comment-preserving config rewrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from classifiers.calibration import rewrite_max_scores, student_share, threshold_for_share

CONFIG = """\
# gateway config
models:
  - name: small   # the 1.5B student
    role: student
    max_score: 0.3   # keep this comment
  - name: mid
    role: student
    max_score: 0.6
  - name: big
    role: teacher
routing:
  default: big  # trailing
"""


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 0.7, 1.0])
def test_threshold_gives_asked_share(share: float) -> None:
    scores = np.random.default_rng(1).random(1000)
    t = threshold_for_share(scores, share)
    assert student_share(scores, t) == pytest.approx(share, abs=1e-9)


def test_rewrite_scales_students_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    changes = rewrite_max_scores(path, 0.42)
    assert changes == [("small", 0.3, 0.21), ("mid", 0.6, 0.42)]
    text = path.read_text()
    assert "max_score: 0.21   # keep this comment" in text
    assert text.replace("0.21", "0.3").replace("0.42", "0.6") == CONFIG
    models = yaml.safe_load(text)["models"]
    assert [m.get("max_score") for m in models] == [0.21, 0.42, None]


def test_rewrite_refuses_without_students(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("models:\n  - name: big\n    role: teacher\n")
    with pytest.raises(ValueError, match="role: student"):
        rewrite_max_scores(path, 0.5)
    assert path.read_text() == "models:\n  - name: big\n    role: teacher\n"
