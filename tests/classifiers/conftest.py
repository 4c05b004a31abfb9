"""Shared fixtures: a small model trained on an in-repo sample into a temp dir (fixed seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from classifiers.artifact import save
from classifiers.dataset import TRAIN_PATH, Row, read_jsonl
from classifiers.train import Fitted, TrainConfig, fit

# A proof, a code task and small talk, so the tiny sample spans what the tests ask about.
_EXTRA: list[Row] = [
    {
        "id": "x:1",
        "source": "x",
        "family": "math",
        "label": 1,
        "prompt": "Prove that for every integer n > 1 the sum of 1/k for k = 1..n is not an integer.",
    },
    {"id": "x:2", "source": "x", "family": "chat", "label": 0, "prompt": "thanks!"},
    {"id": "x:3", "source": "x", "family": "chat", "label": 0, "prompt": "hello, how are you?"},
]


def sample_rows(n: int = 400) -> list[Row]:
    """Every k-th labelled training row: a small sample covering every source."""
    rows = [r for r in read_jsonl(TRAIN_PATH) if r.get("label") is not None]
    step = max(1, len(rows) // n)
    return rows[::step][:n] + _EXTRA


@pytest.fixture(scope="session")
def fitted() -> Fitted:
    """A model fitted on the sample (fixed seed, 2 calibration folds)."""
    # A loose tolerance keeps this fit to seconds; exactness tests compare against this very
    # estimator, so how far it converged does not matter.
    return fit(sample_rows(300), TrainConfig(calibration_folds=2, seed=0, tol=1e-2))


@pytest.fixture(scope="session")
def model_path(fitted: Fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample model saved as an artifact."""
    path = tmp_path_factory.mktemp("model") / "complexity.joblib"
    save(fitted.artifact, path)
    return path
