"""Offline training: featurize rows, fit logistic regression, calibrate, save the artifact.

The artifact is a plain dict of numpy arrays and numbers (no pickled estimator), so the
gateway loads it without importing scikit-learn and scores with a dot product
(`classifiers.learned`). Training is deterministic: the same rows give the same bytes.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from classifiers import features as F
from classifiers.artifact import FORMAT, FORMAT_VERSION, feature_spec
from classifiers.dataset import Row


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs (picked from a handful of settings by dev AUROC; see MODEL_CARD)."""

    c: float = 4.0
    # Rows without a hard label can train on their `target` as a soft label, with this
    # weight; on dev it made no difference (MODEL_CARD), so the shipped model leaves them out.
    soft_weight: float = 0.0
    # Chat is the thinnest family and the one the gateway sees most: upweight it.
    family_weight: tuple[tuple[str, float], ...] = (("chat", 3.0),)
    calibration_folds: int = 3
    seed: int = 0
    max_iter: int = 300
    tol: float = 1e-4


@dataclass(frozen=True)
class Fitted:
    """A training run: the artifact to save, plus the estimator and matrix (for checks)."""

    artifact: dict[str, Any]
    estimator: LogisticRegression
    matrix: sparse.csr_matrix


def featurize_all(texts: Sequence[str], desc: str = "features") -> list[F.Features]:
    """Features of many texts, with a progress bar on stderr."""
    return [F.featurize(t) for t in tqdm(texts, desc=desc, file=sys.stderr, leave=False)]


def _targets(rows: Sequence[Row], config: TrainConfig) -> tuple[npt.NDArray[np.float64], ...]:
    """Per-row target in [0, 1] and sample weight."""
    fam_w = dict(config.family_weight)
    target = np.empty(len(rows))
    weight = np.empty(len(rows))
    for i, row in enumerate(rows):
        if row.get("label") is not None:
            target[i] = float(row["label"])
            weight[i] = 1.0
        else:
            target[i] = float(row["target"])
            weight[i] = config.soft_weight
        weight[i] *= fam_w.get(str(row.get("family")), 1.0)
    return target, weight


def _fit(
    x: sparse.csr_matrix,
    target: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    config: TrainConfig,
) -> LogisticRegression:
    # A soft target t becomes two rows: label 1 with weight t, label 0 with weight 1 - t.
    xx = sparse.vstack([x, x], format="csr")
    yy = np.r_[np.ones(len(target)), np.zeros(len(target))]
    ww = np.r_[weight * target, weight * (1 - target)]
    keep = ww > 0
    model = LogisticRegression(C=config.c, max_iter=config.max_iter, tol=config.tol)
    model.fit(xx[keep], yy[keep], sample_weight=ww[keep])
    return model


def _platt(
    z: npt.NDArray[np.float64], y: npt.NDArray[np.float64], w: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """Sigmoid calibration p = 1 / (1 + exp(-(a z + b))) fitted on out-of-fold scores."""
    lr = LogisticRegression(C=1e6, tol=1e-10, max_iter=1000)
    lr.fit(
        np.r_[z, z].reshape(-1, 1),
        np.r_[np.ones(len(z)), np.zeros(len(z))],
        sample_weight=np.r_[w * y, w * (1 - y)],
    )
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def fit(rows: Sequence[Row], config: TrainConfig | None = None) -> Fitted:
    """Fit the scorer on labelled rows (`label` 0/1, or `target` for soft rows)."""
    config = config or TrainConfig()
    feats = featurize_all([str(r["prompt"]) for r in rows])
    cues = np.stack([f.cues for f in feats])
    cue_mean = cues.mean(axis=0)
    # Constant cues (std 0) get std 1 so they stay 0 after scaling.
    cue_std = np.where(cues.std(axis=0) > 0, cues.std(axis=0), 1.0)
    idf = F.idf_weights(F.document_frequency(feats), len(feats))
    x = F.feature_matrix(feats, idf, cue_mean, cue_std)
    target, weight = _targets(rows, config)

    # Out-of-fold decision values for calibration: the final model's own training scores
    # are overconfident.
    oof = np.zeros(len(rows))
    folds = StratifiedKFold(config.calibration_folds, shuffle=True, random_state=config.seed)
    strata = np.rint(target).astype(int)
    for tr, te in tqdm(list(folds.split(x, strata)), desc="calibration folds", file=sys.stderr, leave=False):
        oof[te] = _fit(x[tr], target[tr], weight[tr], config).decision_function(x[te])
    calib_a, calib_b = _platt(oof, target, weight)

    with tqdm(total=1, desc="final fit", file=sys.stderr, leave=False) as bar:
        model = _fit(x, target, weight, config)
        bar.update()
    coef = model.coef_[0]
    artifact: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": {
            "sklearn_version": version("scikit-learn"),
            "numpy_version": np.__version__,
            "features": feature_spec(),
            "train_config": asdict(config),
            "n_rows": len(rows),
            "rows_by_source": dict(sorted(Counter(str(r["source"]) for r in rows).items())),
            "rows_sha256": _rows_digest(rows),
        },
        "ngram_weights": np.ascontiguousarray(coef[: F.N_BUCKETS]),
        "idf": idf.astype(np.float32),
        "cue_weights": np.ascontiguousarray(coef[F.N_BUCKETS :]),
        "cue_mean": cue_mean,
        "cue_std": cue_std,
        "intercept": float(model.intercept_[0]),
        "calibration": (calib_a, calib_b),
    }
    return Fitted(artifact=artifact, estimator=model, matrix=x)


def _rows_digest(rows: Sequence[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.get('id')}\t{r.get('label')}\t{r.get('target')}\n".encode())
    return h.hexdigest()
