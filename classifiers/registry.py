"""Scorer kinds by name, and the loader the gateway calls at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from classifiers.base import Scorer
from classifiers.heuristic import HeuristicScorer

ScorerKind = Literal["learned", "heuristic"]


def load_scorer(kind: ScorerKind, path: Path | None = None) -> Scorer:
    """Build the scorer named by config: `heuristic`, or `learned` from an artifact at `path`."""
    if kind == "heuristic":
        return HeuristicScorer()
    if path is None:
        raise ValueError("classifier.path is required for a learned classifier")
    from classifiers.learned import LearnedScorer

    return LearnedScorer.load(path)
