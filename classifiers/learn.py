"""Learning from traffic: stored outcomes become labels for this student; the router is refitted on them.

Labels (`label_traffic`), per stored request that has its prompt (`captured`):
- a student answer escalated by a quality check (`quality` names the failed check) -> hard (1);
- a shadow comparison with the teacher below `hard_below` agreement -> hard (1);
- a shadow comparison at or above `easy_from` agreement -> easy (0);
- anything else gives no label (teacher-routed requests, agreement in between, no prompt).

Refit (`learn`, `choose_and_fit`): a warm start from the shipped artifact. The new log-odds
are `alpha * shipped(x) + delta . features(x) + b`, where `features` are the shipped model's
own hashed n-gram TF-IDF and cue features (its IDF and cue scaling kept), `delta` is
L2-penalised towards zero (so with few labels the model stays the shipped one) and
`alpha >= ALPHA_MIN` (1) may sharpen the shipped ranking but never flatten it. Because the shipped model
is linear in the same features, the result folds back into an artifact of the same format:
the gateway scores it exactly as before, with no new code on the hot path.
The penalty (`C_GRID`) and the n-gram block's scale against the cues (`NGRAM_SCALES`) are
picked by cross-validated log-loss on the traffic labels, folds by prompt.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
from scipy import optimize, sparse
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from classifiers import features as F
from classifiers.learned import LearnedScorer
from classifiers.metrics import auroc, routing_curve
from router.records import RequestRecord, ShadowRecord

F64 = npt.NDArray[np.float64]

# Penalties tried for the change from the shipped weights (larger = labels move it more).
C_GRID: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
# The cues (69 standardised columns) outweigh the two unit-norm n-gram blocks in the penalty;
# scaling the n-grams up lets the labels lean on wording where that predicts better.
NGRAM_SCALES: tuple[float, ...] = (1.0, 3.0, 10.0)
# Below this many labels of either class the shipped model is kept as it is.
MIN_PER_CLASS = 10
ALPHA_MIN = 1.0


@dataclass(frozen=True)
class LabelRule:
    """Where shadow agreement stops meaning "the student was right"."""

    hard_below: float = 0.5
    easy_from: float = 0.8
    student: str | None = None  # only this student's outcomes (None: every student)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hard_below <= self.easy_from <= 1.0:
            raise ValueError("need 0 <= hard_below <= easy_from <= 1")


@dataclass(frozen=True)
class Example:
    """One labelled request: its prompt and whether it needed the teacher."""

    request_id: str
    ts: float
    prompt: str
    label: int  # 1 = hard (needs the teacher), 0 = easy (the student's answer agreed)
    why: str  # "shadow" or "quality:<failed check>"


@dataclass
class LabelCounts:
    """How the stored requests turned into labels (or why they did not)."""

    requests: int = 0
    hard_quality: int = 0
    hard_shadow: int = 0
    easy_shadow: int = 0
    between: int = 0  # shadow agreement between hard_below and easy_from
    no_prompt: int = 0  # would have had a label, but capture did not keep the prompt
    other_student: int = 0

    @property
    def labelled(self) -> int:
        return self.hard_quality + self.hard_shadow + self.easy_shadow


Traffic = Iterable[tuple[RequestRecord, Sequence[ShadowRecord]]]


def pair_shadows(requests: Iterable[RequestRecord], shadows: Iterable[ShadowRecord]) -> Traffic:
    """Join request records with the shadow comparisons made for them (by request id)."""
    by_id: dict[str, list[ShadowRecord]] = {}
    for s in shadows:
        by_id.setdefault(s.request_id, []).append(s)
    return [(r, by_id.get(r.request_id, [])) for r in requests]


def label_traffic(traffic: Traffic, rule: LabelRule | None = None) -> tuple[list[Example], LabelCounts]:
    """Labels for the student from stored requests and their shadow comparisons."""
    rule = rule or LabelRule()
    counts = LabelCounts()
    out: list[Example] = []
    for record, shadows in traffic:
        counts.requests += 1
        label: int | None = None
        why = "shadow"
        if record.escalated:
            student = record.attempted[0] if record.attempted else None
            if rule.student is not None and student != rule.student:
                counts.other_student += 1
                continue
            label, why = 1, f"quality:{record.quality}"
        else:
            mine = [s for s in shadows if rule.student is None or s.student == rule.student]
            if shadows and not mine:
                counts.other_student += 1
                continue
            if not mine:
                continue
            agreement = min(s.agreement for s in mine)
            if agreement < rule.hard_below:
                label = 1
            elif agreement >= rule.easy_from:
                label = 0
            else:
                counts.between += 1
                continue
        if not record.prompt:
            counts.no_prompt += 1
            continue
        if why == "shadow":
            if label:
                counts.hard_shadow += 1
            else:
                counts.easy_shadow += 1
        else:
            counts.hard_quality += 1
        out.append(Example(record.request_id, record.ts, record.prompt, label, why))
    return out, counts


def prompt_fold(prompt: str, folds: int) -> int:
    """A stable fold per prompt text, so a repeated prompt never sits on both sides of a split."""
    digest = hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") % folds


@dataclass(frozen=True)
class Design:
    """The shipped model's features and log-odds for a set of prompts."""

    x: sparse.csr_matrix
    base: F64  # the shipped model's raw log-odds

    def rows(self, idx: npt.NDArray[np.intp]) -> Design:
        return Design(self.x[idx], self.base[idx])


def design(scorer: LearnedScorer, artifact: dict[str, Any], prompts: Sequence[str]) -> Design:
    """Features in the shipped artifact's own scaling, and its log-odds, for `prompts`."""
    if not prompts:
        return Design(sparse.csr_matrix((0, F.N_BUCKETS + F.N_CUES)), np.zeros(0))
    feats = F.featurize_many(prompts)
    idf = np.asarray(artifact["idf"], np.float64)
    x = F.feature_matrix(feats, idf, np.asarray(artifact["cue_mean"]), np.asarray(artifact["cue_std"]))
    base = np.array([scorer.decision(p) for p in prompts])
    return Design(x, base)


@dataclass(frozen=True)
class Delta:
    """A fitted change to the shipped model: alpha * shipped + x . coef + intercept."""

    alpha: float
    coef: F64  # over F.N_BUCKETS + F.N_CUES columns
    intercept: float
    c: float
    scale: float = 1.0  # the n-gram columns' scale in the fit

    def decision(self, d: Design) -> F64:
        out: F64 = self.alpha * d.base + d.x @ self.coef + self.intercept
        return out


def gram_parts(d: Design) -> tuple[F64, F64]:
    """The labels' inner products over the n-gram columns and over the cue columns.

    The representer form of the penalised fit needs only these: with the n-gram block
    scaled by `s`, the Gram matrix is `s**2 * ngrams + cues`.
    """
    ng, cues = d.x[:, : F.N_BUCKETS], d.x[:, F.N_BUCKETS :]
    g_ng: F64 = np.asarray((ng @ ng.T).todense(), dtype=np.float64)
    g_cue: F64 = np.asarray((cues @ cues.T).todense(), dtype=np.float64)
    return g_ng, g_cue


def _fit_dual(g: F64, base: F64, y: F64, w: F64, c: float) -> tuple[float, float, F64]:
    # alpha below 1 would flatten the shipped ranking everywhere, including above the
    # threshold where traffic has no labels (only student-served requests are shadowed).
    """(alpha, intercept, beta) minimising weighted log-loss + beta.G.beta / (2c), alpha >= 0."""
    s = 2 * y - 1
    n = len(y)

    def loss(theta: F64) -> tuple[float, F64]:
        alpha, b, beta = theta[0], theta[1], theta[2:]
        kb = g @ beta
        m = alpha * base + kb + b
        sm = s * m
        value = float(np.sum(w * np.logaddexp(0.0, -sm))) + float(beta @ kb) / (2 * c)
        r = -w * s * _sigmoid(-sm)
        grad = np.empty_like(theta)
        grad[0] = float(r @ base)
        grad[1] = float(r.sum())
        grad[2:] = g @ (r + beta / c)
        return value, grad

    theta0 = np.zeros(n + 2)
    theta0[0] = 1.0
    bounds = [(ALPHA_MIN, None)] + [(None, None)] * (n + 1)
    res = optimize.minimize(
        loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 1000, "ftol": 1e-9}
    )
    return float(res.x[0]), float(res.x[1]), np.asarray(res.x[2:], dtype=np.float64)


def fit_delta(
    d: Design, y: F64, w: F64, c: float, scale: float = 1.0, parts: tuple[F64, F64] | None = None
) -> Delta:
    """Minimise weighted log-loss + |coef|^2 / (2c) over (alpha >= ALPHA_MIN, coef, intercept),
    with the n-gram columns scaled by `scale` (a weaker penalty on them than on the cues).

    With far fewer labels than features the penalised optimum has coef = x.T @ beta
    (representer theorem), so the search runs over one beta per label on the Gram matrix
    instead of over half a million columns. BLAS runs on one thread: on a busy machine
    threads fighting over cores made these small products a hundred times slower.
    """
    with threadpool_limits(1):
        g_ng, g_cue = gram_parts(d) if parts is None else parts
        alpha, b, beta = _fit_dual(scale * scale * g_ng + g_cue, d.base, y, w, c)
        coef = np.asarray(d.x.T @ beta, dtype=np.float64).ravel()
    coef[: F.N_BUCKETS] *= scale * scale
    return Delta(alpha=alpha, coef=coef, intercept=b, c=c, scale=scale)


def _sigmoid(z: F64) -> F64:
    out: F64 = np.exp(-np.logaddexp(0.0, -z))
    return out


def _log_loss(y: F64, z: F64, w: F64) -> float:
    return float(np.sum(w * np.logaddexp(0.0, -(2 * y - 1) * z)) / max(w.sum(), 1e-12))


@dataclass(frozen=True)
class Scores:
    """Ranking quality of one set of scores on labelled traffic."""

    n: int
    hard: int
    auroc: float
    apgr: float
    pgr_at_30: float  # PGR with 30% of requests on the teacher (70% on the student)


def evaluate(labels: Sequence[int] | F64, scores: Sequence[float] | F64) -> Scores:
    """AUROC, and APGR with the teacher right on every prompt and the student right on easy ones."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if len(y) == 0:
        return Scores(0, 0, float("nan"), float("nan"), float("nan"))
    try:
        curve = routing_curve(s, np.ones(len(y)), 1.0 - y)
        apgr, pgr = curve.apgr(), curve.pgr_at(0.3)
    except ValueError:
        apgr = pgr = float("nan")
    return Scores(len(y), int(y.sum()), auroc(y, s), apgr, pgr)


@dataclass
class Refit:
    """A refit and how it did."""

    delta: Delta
    # (C, n-gram scale) -> cross-validated log-loss
    c_scores: dict[tuple[float, float], float] = field(default_factory=dict)


def choose_and_fit(d: Design, y: F64, w: F64, prompts: Sequence[str], folds: int = 3) -> Refit:
    """Pick C and the n-gram scale by cross-validated log-loss (folds by prompt), then fit on all."""
    fold = np.array([prompt_fold(p, folds) for p in prompts])
    scores: dict[tuple[float, float], float] = {}
    with threadpool_limits(1):
        parts = gram_parts(d)
        for scale in NGRAM_SCALES:
            g = scale * scale * parts[0] + parts[1]
            for c in C_GRID:
                total, weight = 0.0, 0.0
                for k in range(folds):
                    tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
                    if len(te) == 0 or len(np.unique(y[tr])) < 2:
                        continue
                    alpha, b, beta = _fit_dual(g[np.ix_(tr, tr)], d.base[tr], y[tr], w[tr], c)
                    z = alpha * d.base[te] + g[np.ix_(te, tr)] @ beta + b
                    total += _log_loss(y[te], z, w[te]) * w[te].sum()
                    weight += w[te].sum()
                scores[c, scale] = total / weight if weight else math.inf
    c, scale = min(scores, key=lambda k: (scores[k], k))
    return Refit(fit_delta(d, y, w, c, scale, parts), scores)


def apply_delta(
    artifact: dict[str, Any], delta: Delta, calibration: tuple[float, float], info: dict[str, Any]
) -> dict[str, Any]:
    """A new artifact of the same format whose raw log-odds are `delta`'s decision."""
    a = delta.alpha
    coef = delta.coef
    new = dict(artifact)
    new["ngram_weights"] = a * np.asarray(artifact["ngram_weights"], np.float64) + coef[: F.N_BUCKETS]
    new["cue_weights"] = a * np.asarray(artifact["cue_weights"], np.float64) + coef[F.N_BUCKETS :]
    new["intercept"] = a * float(artifact["intercept"]) + delta.intercept
    new["token_weights"] = a * np.asarray(artifact["token_weights"], np.float64)
    new["semantic_offset"] = a * float(artifact["semantic_offset"])
    new["semantic_center"] = a * float(artifact["semantic_center"])
    new["calibration"] = calibration
    metadata = dict(artifact["metadata"])
    metadata["learned_from_traffic"] = {
        **info,
        "alpha": a,
        "c": delta.c,
        "ngram_scale": delta.scale,
        "base_rows_sha256": artifact["metadata"].get("rows_sha256"),
    }
    new["metadata"] = metadata
    return new


def label_summary(examples: Sequence[Example]) -> str:
    """One line: how many labels of each kind."""
    kinds = Counter("hard" if e.label else "easy" for e in examples)
    return f"{len(examples)} labels ({kinds['hard']} hard, {kinds['easy']} easy)"


@dataclass
class LearnResult:
    """What `learn` made: the artifact, its thresholds, and the before/after report."""

    artifact: dict[str, Any]
    threshold: float
    share: float
    prompts: int
    before: Scores
    after: Scores
    refit: Refit
    train_labels: int

    def report(self) -> str:
        """The before/after table and the chosen settings, as printed by `triage learn`."""
        b, a = self.before, self.after
        lines = [
            f"held-out traffic: {b.n} labels ({b.hard} hard) on prompts never fitted on; "
            f"fitted on the other {self.train_labels}",
            f"{'':8s} {'AUROC':>6s} {'APGR':>6s} {'PGR@30%':>8s}",
            f"{'before':8s} {b.auroc:6.3f} {b.apgr:6.3f} {b.pgr_at_30:8.3f}",
            f"{'after':8s} {a.auroc:6.3f} {a.apgr:6.3f} {a.pgr_at_30:8.3f}",
            f"penalty C={self.refit.delta.c:g}, n-gram scale {self.refit.delta.scale:g} (cross-validated), "
            f"shipped weight alpha={self.refit.delta.alpha:.2f}",
            f"threshold {self.threshold:.6f} sends {self.share:.1%} of {self.prompts} "
            "captured prompts to students",
        ]
        return "\n".join(lines)


def split_holdout(examples: Sequence[Example], folds: int) -> tuple[list[Example], list[Example]]:
    """(fit, held out): the held-out part is one of `folds` prompt folds, so repeats stay together."""
    held = [e for e in examples if prompt_fold(e.prompt, folds) == 0]
    return [e for e in examples if prompt_fold(e.prompt, folds) != 0], held


def fit_examples(scorer: LearnedScorer, artifact: dict[str, Any], examples: Sequence[Example]) -> Refit:
    """Choose the penalty and fit the change from `artifact` on labelled examples."""
    prompts = [e.prompt for e in examples]
    y = np.array([e.label for e in examples], dtype=np.float64)
    return choose_and_fit(design(scorer, artifact, prompts), y, np.ones(len(y)), prompts)


def learn(
    model: Path, examples: Sequence[Example], prompts: Sequence[str], share: float, folds: int = 5
) -> LearnResult:
    """Report on a held-out fold, refit on every label, and set thresholds for `share`.

    `prompts` are the captured prompts of scored requests: the new model's threshold sends
    `share` of them to students. The shipped calibration is kept: labels come only from
    requests students served, too narrow a range to refit it on.
    """
    from classifiers.calibration import student_share, threshold_for_share

    artifact = joblib.load(model)
    scorer = LearnedScorer(artifact)
    fit_part, held = split_holdout(examples, folds)
    if min(sum(e.label for e in fit_part), sum(1 - e.label for e in fit_part)) < MIN_PER_CLASS:
        fit_part, held = list(examples), []
    refit = fit_examples(scorer, artifact, fit_part)
    y_held = [e.label for e in held]
    d_held = design(scorer, artifact, [e.prompt for e in held])
    before = evaluate(y_held, d_held.base)
    after = evaluate(y_held, refit.delta.decision(d_held))
    final = fit_examples(scorer, artifact, examples) if held else refit
    info = {"labels": len(examples), "hard": int(sum(e.label for e in examples))}
    new = apply_delta(artifact, final.delta, tuple(artifact["calibration"]), info)
    new_scorer = LearnedScorer(new)
    scores = new_scorer.score_many(prompts) if prompts else []
    threshold = threshold_for_share(scores, share) if scores else float("nan")
    got = student_share(scores, threshold) if scores else float("nan")
    new["metadata"]["learned_from_traffic"]["threshold"] = threshold
    return LearnResult(new, threshold, got, len(prompts), before, after, final, len(fit_part))


_PATH_LINE = re.compile(r"^(?P<head>.*\bpath:\s*)(?P<value>[^\s,}#]+)(?P<tail>.*)$")


def point_classifier(config_path: Path, model: Path) -> None:
    """Make the config's `classifier.path` name `model` (absolute); keep the rest of the file."""
    import yaml

    text = config_path.read_text()
    current = ((yaml.safe_load(text) or {}).get("classifier") or {}).get("path")
    if current is None:
        raise ValueError(f"{config_path}: no classifier.path to point at the new model")
    lines = text.splitlines(keepends=True)
    hits = [
        i
        for i, line in enumerate(lines)
        if (m := _PATH_LINE.match(line.rstrip("\r\n"))) and m["value"].strip("'\"") == str(current)
    ]
    if len(hits) != 1:
        raise ValueError(f"{config_path}: found {len(hits)} lines with `path: {current}`; edit it by hand")
    i = hits[0]
    m = _PATH_LINE.match(lines[i].rstrip("\r\n"))
    assert m is not None
    newline = lines[i][len(lines[i].rstrip("\r\n")) :]
    lines[i] = f"{m['head']}{model.resolve()}{m['tail']}{newline}"
    new_text = "".join(lines)
    got = ((yaml.safe_load(new_text) or {}).get("classifier") or {}).get("path")
    if got != str(model.resolve()):
        raise ValueError(f"{config_path}: rewrite check failed (classifier.path reads {got!r})")
    config_path.write_text(new_text)
