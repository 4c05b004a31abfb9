"""Offline training: featurize rows, fit logistic regression, calibrate, save the artifact.

The artifact is a plain dict of numpy arrays and numbers (no pickled estimator), so the
gateway loads it without importing scikit-learn and scores with a dot product
(`classifiers.learned`). Training is deterministic: the same rows give the same bytes.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from tqdm import tqdm

from classifiers import features as F
from classifiers import static_embed as SE
from classifiers.artifact import FORMAT, FORMAT_VERSION, feature_spec
from classifiers.dataset import Row

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs (picked from a handful of settings by dev AUROC; see MODEL_CARD)."""

    c: float = 4.0
    # Rows without a hard label can train on their `target` as a soft label, with this
    # weight; on dev it made no difference (MODEL_CARD), so the shipped model leaves them out.
    soft_weight: float = 0.0
    # ...except these sources, whose rows only have a soft label: GSM8K-train questions
    # labelled by their solution length (`classifiers.dataset.gsm8k_step_rows`).
    soft_sources: tuple[tuple[str, float], ...] = (("gsm8k_steps", 1.0),)
    # Chat is the thinnest family and the one the gateway sees most: upweight it.
    family_weight: tuple[tuple[str, float], ...] = (("chat", 3.0),)
    calibration_folds: int = 3
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-4
    # Semantic half: a logistic regression on the prompt's static MiniLM vector (standardised),
    # added to the n-gram model's log-odds with `semantic_mix` times the ratio of the two
    # models' out-of-fold score spreads. 0.25 was picked on the routing dev proxies (MODEL_CARD):
    # more helps chat-like prompts, less keeps the n-gram model's edge within math sets.
    semantic_c: float = 1.0
    semantic_mix: float = 0.25
    semantic_dims: int = 256
    semantic_weighting: str = "sif"
    # Pseudo-tokens at the training prompts' mean vector added to every prompt (see
    # `_shrunk_means`): "thanks" alone otherwise gets the extreme score of its one token.
    semantic_prior_tokens: float = 8.0


@dataclass(frozen=True)
class Fitted:
    """A training run: the artifact to save, plus the estimators and inputs (for checks).

    The served log-odds are `estimator`'s decision on the n-gram matrix plus `mix` times
    `semantic`'s decision on `semantic_inputs(texts)` (standardised mean MiniLM vectors).
    """

    artifact: dict[str, Any]
    estimator: LogisticRegression
    matrix: sparse.csr_matrix
    semantic: LogisticRegression
    mix: float
    semantic_inputs: Callable[[Sequence[str]], F64]


def featurize_all(texts: Sequence[str], desc: str = "features") -> list[F.Features]:
    """Features of many texts, with a progress bar on stderr."""
    return [F.featurize(t) for t in tqdm(texts, desc=desc, file=sys.stderr, leave=False)]


def _targets(rows: Sequence[Row], config: TrainConfig) -> tuple[npt.NDArray[np.float64], ...]:
    """Per-row target in [0, 1] and sample weight."""
    fam_w = dict(config.family_weight)
    soft_w = dict(config.soft_sources)
    target = np.empty(len(rows))
    weight = np.empty(len(rows))
    for i, row in enumerate(rows):
        if row.get("label") is not None:
            target[i] = float(row["label"])
            weight[i] = 1.0
        else:
            target[i] = float(row["target"])
            weight[i] = soft_w.get(str(row.get("source")), config.soft_weight)
        weight[i] *= fam_w.get(str(row.get("family")), 1.0)
    return target, weight


def _fit(
    x: sparse.csr_matrix | F64,
    target: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    config: TrainConfig,
) -> LogisticRegression:
    # A soft target t becomes two rows: label 1 with weight t, label 0 with weight 1 - t.
    xx = sparse.vstack([x, x], format="csr") if sparse.issparse(x) else np.vstack([x, x])
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


def _token_sums(texts: Sequence[str], table: SE.TokenTable) -> tuple[F64, F64]:
    """Each text's sum of static MiniLM token vectors (float64) and its token count."""
    enc = SE.TokenEncoder.from_table(table)
    vectors = table.vectors.astype(np.float64)
    sums = np.zeros((len(texts), vectors.shape[1]))
    counts = np.zeros(len(texts))
    for i, ids in enumerate(enc.ids_many(texts)):
        sums[i] = vectors[ids].sum(axis=0)
        counts[i] = len(ids)
    return sums, counts


def _shrunk_means(sums: F64, counts: F64, center: F64, prior: float) -> F64:
    """Mean token vectors pulled toward `center` by `prior` pseudo-tokens.

    A one-word prompt's mean is that word's vector, far from any training prompt's mean: the
    pull keeps a short prompt's semantic score near the average instead of extrapolating.
    """
    out: F64 = (sums + prior * center) / (counts + prior)[:, None]
    return out


def _semantic_table(config: TrainConfig) -> SE.TokenTable:
    weighting: SE.Weighting = "sif" if config.semantic_weighting == "sif" else "none"
    table, _ = SE.load_or_build_table(config.semantic_dims, weighting)
    return table


def fit(rows: Sequence[Row], config: TrainConfig | None = None) -> Fitted:
    """Fit the scorer on labelled rows (`label` 0/1, or `target` for soft rows).

    BLAS runs on one thread: how a reduction is split between threads changes its rounding,
    and the artifact should not depend on the machine's core count.
    """
    with threadpool_limits(1):
        return _fit_all(rows, config or TrainConfig())


def _fit_all(rows: Sequence[Row], config: TrainConfig) -> Fitted:
    feats = featurize_all([str(r["prompt"]) for r in rows])
    cues = np.stack([f.cues for f in feats])
    cue_mean = cues.mean(axis=0)
    # Constant cues (std 0) get std 1 so they stay 0 after scaling.
    cue_std = np.where(cues.std(axis=0) > 0, cues.std(axis=0), 1.0)
    idf = F.idf_weights(F.document_frequency(feats), len(feats))
    x = F.feature_matrix(feats, idf, cue_mean, cue_std)
    target, weight = _targets(rows, config)

    table = _semantic_table(config)
    sums, counts = _token_sums([str(r["prompt"]) for r in rows], table)
    has = counts > 0
    center = (sums[has] / counts[has, None]).mean(axis=0)
    prior = config.semantic_prior_tokens
    emb = _shrunk_means(sums, counts, center, prior)
    emb_mean = emb.mean(axis=0)
    emb_std = np.where(emb.std(axis=0) > 0, emb.std(axis=0), 1.0)
    z_emb = (emb - emb_mean) / emb_std
    sem_config = TrainConfig(c=config.semantic_c, max_iter=1000, tol=config.tol)

    # Out-of-fold decision values for calibration and for the mix: the final models' own
    # training scores are overconfident.
    oof = np.zeros(len(rows))
    oof_sem = np.zeros(len(rows))
    folds = StratifiedKFold(config.calibration_folds, shuffle=True, random_state=config.seed)
    strata = np.rint(target).astype(int)
    for tr, te in tqdm(list(folds.split(x, strata)), desc="calibration folds", file=sys.stderr, leave=False):
        oof[te] = _fit(x[tr], target[tr], weight[tr], config).decision_function(x[te])
        oof_sem[te] = _fit(z_emb[tr], target[tr], weight[tr], sem_config).decision_function(z_emb[te])
    used = weight > 0
    mix = config.semantic_mix * float(oof[used].std() / oof_sem[used].std())
    calib_a, calib_b = _platt(oof + mix * oof_sem, target, weight)

    with tqdm(total=2, desc="final fit", file=sys.stderr, leave=False) as bar:
        model = _fit(x, target, weight, config)
        bar.update()
        sem = _fit(z_emb, target, weight, sem_config)
        bar.update()
    coef = model.coef_[0]
    # mix * (w . (v - mu) / sd + b) with v = (sum_t v_t + k c) / (n + k) equals
    # (sum_t token_weights[t] + k * semantic_center) / (n + k) + semantic_offset.
    w_sem = mix * sem.coef_[0] / emb_std
    token_weights = table.vectors.astype(np.float64) @ w_sem
    semantic_center = float(center @ w_sem)
    semantic_offset = mix * float(sem.intercept_[0]) - float(emb_mean @ w_sem)
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
            "semantic_table_sha256": hashlib.sha256(table.vectors.tobytes()).hexdigest(),
            "semantic_mix": mix,
        },
        "ngram_weights": np.ascontiguousarray(coef[: F.N_BUCKETS]),
        "idf": idf.astype(np.float32),
        "cue_weights": np.ascontiguousarray(coef[F.N_BUCKETS :]),
        "cue_mean": cue_mean,
        "cue_std": cue_std,
        "intercept": float(model.intercept_[0]),
        "token_weights": token_weights,
        "semantic_offset": semantic_offset,
        "semantic_center": semantic_center,
        "semantic_prior_tokens": float(prior),
        "tokenizer_json": table.tokenizer_json,
        "calibration": (calib_a, calib_b),
    }

    def semantic_inputs(texts: Sequence[str]) -> F64:
        z: F64 = (_shrunk_means(*_token_sums(texts, table), center, prior) - emb_mean) / emb_std
        return z

    return Fitted(
        artifact=artifact,
        estimator=model,
        matrix=x,
        semantic=sem,
        mix=mix,
        semantic_inputs=semantic_inputs,
    )


def _rows_digest(rows: Sequence[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.get('id')}\t{r.get('label')}\t{r.get('target')}\n".encode())
    return h.hexdigest()
