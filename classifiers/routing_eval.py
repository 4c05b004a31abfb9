"""Routing quality for several strong/weak model pairs, overall and per family.

The in-repo routing dev set (`routing_dev.jsonl.gz`) carries per-model `outcomes` (quality in
[0, 1]; see `classifiers.dataset.MODEL_KEYS`), so one scorer can be judged for every pair of
models measured on the same prompts, not only the default gpt-4 vs mistral-7b pair in
`strong_score`/`weak_score`. For each pair in `PAIRS` and each group (all rows, each family)
this reports RouteLLM's APGR, PGR with 30% of calls on the strong model (70% on the weak one),
CPT(50%) and n; groups where the strong model is not better on average have no PGR and are
listed as skipped. It also reports dev AUROC per family on `dev.jsonl.gz` labels.

Optional eval-only chat set, built on the fly from `shared/data/alpaca_eval` when that folder
exists (CC BY-NC 4.0: never copied into the repo, never trained on): AlpacaEval 2's GPT-4-Turbo
binary judge (`alpaca_eval_gpt4_turbo_fn`) compared Mixtral-8x7B-Instruct-v0.1's answer with the
gpt4_1106_preview baseline's on each instruction; `preference` is in [1, 2], 2 meaning Mixtral
won, so p = preference - 1 = P(Mixtral preferred) (1.5, a tie, gives 0.5). Pairwise preference
has no absolute score: routing a prompt to the strong model yields the baseline's answer, which
wins that comparison with probability 1 - p, and routing it to Mixtral yields p. So strong = 1 - p
and weak = p. Scoring instead against the baseline itself (strong = 0.5, a tie with itself,
weak = p) gives gains 0.5 - p, half of 1 - 2p; PGR, a ratio of gains, is the same either way.
The weighted (logprob) AlpacaEval 2 annotator has only Mixtral's `_concise` prompt variant here,
so the binary judge is used.

    python -m classifiers.routing_eval [--model PATH] [--shared DIR]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from classifiers.dataset import DEV_PATH, ROUTING_DEV_PATH, TRAIN_PATH, Row, read_jsonl
from classifiers.metrics import auroc, routing_curve

REPO = Path(__file__).resolve().parents[1]
# shared/ sits beside the clone (CI keeps a copy at ../shared).
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_MODEL = Path(__file__).parent / "models" / "complexity.joblib"

STRONG_SHARE = 0.3  # PGR reported at this share of strong calls (70% of traffic on the weak model)
# PGR divides by the mean gap; below this (on a [0, 1] quality scale) values are unstable.
SMALL_GAP = 0.05
ALPACA_GROUP = "alpaca_eval*"
ALPACA_NOTE = (
    "*alpaca_eval: eval-only, CC BY-NC, not in repo (GPT-4-Turbo judge, pairwise vs gpt4_1106_preview)"
)
_ALPACA_ANNOTATOR = "alpaca_eval_gpt4_turbo_fn"
_ALPACA_BASELINE = "gpt4_1106_preview"
# AlpacaEval generator name -> model key (classifiers.dataset.MODEL_KEYS) it is compared under.
_ALPACA_MODELS = {"Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b"}

Scores = npt.NDArray[np.float64]
Scorer = Callable[[Sequence[str]], npt.ArrayLike]
# A scorer, or scores aligned to `EvalData.texts`.
ScoreSource = Scorer | Sequence[float] | Scores


@dataclass(frozen=True)
class Pair:
    """A strong and a weak model, by outcome key (or `strong_score`/`weak_score`)."""

    strong: str
    weak: str

    @property
    def name(self) -> str:
        if (self.strong, self.weak) == ("strong_score", "weak_score"):
            return "default pair (strong_score vs weak_score)"
        return f"{self.strong} vs {self.weak}"

    def qualities(self, row: Row) -> tuple[float, float] | None:
        """(strong, weak) quality on this row, or None when either was not measured."""
        pairwise = (row.get("pair_outcomes") or {}).get(f"{self.strong}|{self.weak}")
        if pairwise is not None:
            return float(pairwise[0]), float(pairwise[1])
        outcomes = row.get("outcomes") or {}
        got = [
            outcomes.get(key, row.get(key) if key.endswith("_score") else None)
            for key in (self.strong, self.weak)
        ]
        if got[0] is None or got[1] is None:
            return None
        return float(got[0]), float(got[1])


DEFAULT_PAIR = Pair("strong_score", "weak_score")
# The held-out check scores GPT-4 vs Mixtral-8x7B; the others show how the ranking transfers.
PAIRS: tuple[Pair, ...] = (
    Pair("gpt-4-1106-preview", "mixtral-8x7b"),
    Pair("gpt-4-1106-preview", "mistral-7b"),
    Pair("gpt-3.5-turbo-1106", "mistral-7b"),
    Pair("claude-v2", "mistral-7b"),
    DEFAULT_PAIR,
)


@dataclass(frozen=True)
class PairResult:
    """One pair on one group of rows. `apgr` etc. are None when the gap is not positive."""

    pair: Pair
    group: str
    n: int
    gap: float  # mean strong quality minus mean weak quality
    apgr: float | None
    pgr: float | None  # at STRONG_SHARE
    cpt50: float | None


@dataclass(frozen=True)
class Evaluation:
    routing: list[PairResult]
    auroc: dict[str, tuple[int, float]]  # group -> (n, AUROC) on dev labels


@dataclass
class EvalData:
    """The rows a scorer is judged on; `texts` fixes the order for precomputed scores."""

    routing: list[Row]
    dev: list[Row]
    alpaca: list[Row]
    alpaca_dropped: int = 0  # alpaca instructions left out because the training set holds them

    @property
    def texts(self) -> list[str]:
        return [str(r["prompt"]) for r in self.routing + self.dev + self.alpaca]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def load_alpaca(shared: Path, exclude: Iterable[str] = ()) -> tuple[list[Row], int]:
    """The eval-only AlpacaEval chat rows (empty without the folder) and how many were excluded.

    Only instructions listed in `instructions.jsonl` are used (804 of the 805 annotated: idx 791
    is not listed in the shared copy, so it is left out too), minus any whose normalised text is
    in `exclude` (the training prompts: none, as alpaca_eval never enters the repo).
    """
    folder = shared / "alpaca_eval"
    if not (folder / "annotations_compact.csv.gz").is_file():
        return [], 0
    instructions = {int(r["idx"]): str(r["instruction"]) for r in read_jsonl(folder / "instructions.jsonl")}
    banned = {_norm(t) for t in exclude}
    prefs: dict[int, dict[str, float]] = {}
    with gzip.open(folder / "annotations_compact.csv.gz", "rt", encoding="utf-8", newline="") as f:
        for a in csv.DictReader(f):
            key = _ALPACA_MODELS.get(a["generator_2"])
            if key is None or a["annotator"] != _ALPACA_ANNOTATOR or a["generator_1"] != _ALPACA_BASELINE:
                continue
            if a["preference"] in ("", "nan"):
                continue
            p = min(max(float(a["preference"]) - 1.0, 0.0), 1.0)  # P(model preferred to baseline)
            prefs.setdefault(int(float(a["idx"])), {})[key] = p
    rows: list[Row] = []
    dropped = 0
    for idx in sorted(set(prefs) & set(instructions)):
        if _norm(instructions[idx]) in banned:
            dropped += 1
            continue
        pair_outcomes = {
            f"gpt-4-1106-preview|{k}": [round(1 - p, 4), round(p, 4)] for k, p in prefs[idx].items()
        }
        rows.append(
            {
                "id": f"alpaca_eval:{idx}",
                "source": "alpaca_eval",
                "family": "chat",
                "prompt": instructions[idx],
                "pair_outcomes": pair_outcomes,
            }
        )
    return rows, dropped


def load_data(shared: Path | None = DEFAULT_SHARED) -> EvalData:
    """Routing dev rows, labelled dev rows and (when `shared` has it) the AlpacaEval set."""
    routing = list(read_jsonl(ROUTING_DEV_PATH))
    dev = [r for r in read_jsonl(DEV_PATH) if r.get("label") is not None]
    alpaca: list[Row] = []
    dropped = 0
    if shared is not None:
        train_prompts = [str(r["prompt"]) for r in read_jsonl(TRAIN_PATH)]
        alpaca, dropped = load_alpaca(shared, exclude=train_prompts)
    return EvalData(routing=routing, dev=dev, alpaca=alpaca, alpaca_dropped=dropped)


def _groups(rows: Sequence[Row], alpaca: bool = False) -> dict[str, list[int]]:
    if alpaca:
        return {ALPACA_GROUP: list(range(len(rows)))} if rows else {}
    groups: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for i, row in enumerate(rows):
        if row.get("family") is not None:
            groups.setdefault(f"family={row['family']}", []).append(i)
    return {g: groups[g] for g in sorted(groups, key=lambda g: (g != "all", g))}


def pair_results(
    scores: npt.ArrayLike, rows: Sequence[Row], pairs: Sequence[Pair] = PAIRS, alpaca: bool = False
) -> list[PairResult]:
    """APGR, PGR@30% and CPT(50%) per pair and group, over rows measuring both models."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) != len(rows):
        raise ValueError(f"{len(s)} scores for {len(rows)} rows")
    out = []
    for pair in pairs:
        for group, idx in _groups(rows, alpaca).items():
            measured = [(i, q) for i in idx if (q := pair.qualities(rows[i])) is not None]
            if not measured:
                continue
            strong = np.array([q[0] for _, q in measured])
            weak = np.array([q[1] for _, q in measured])
            gap = float(strong.mean() - weak.mean())
            apgr = pgr = cpt = None
            if gap > 0:
                curve = routing_curve(s[[i for i, _ in measured]], strong, weak)
                apgr, pgr, cpt = curve.apgr(), curve.pgr_at(STRONG_SHARE), curve.cpt(0.5)
            out.append(PairResult(pair, group, len(measured), gap, apgr, pgr, cpt))
    return out


def dev_auroc(scores: npt.ArrayLike, rows: Sequence[Row]) -> dict[str, tuple[int, float]]:
    """AUROC of the scores against `label`, overall and per family."""
    s = np.asarray(scores, dtype=np.float64)
    labels = np.array([float(r["label"]) for r in rows])
    return {g: (len(idx), auroc(labels[idx], s[idx])) for g, idx in _groups(rows).items()}


def _as_scores(source: ScoreSource, data: EvalData) -> tuple[Scores, Scores, Scores]:
    """Scores for (routing, dev, alpaca) rows from a scorer or from scores aligned to data.texts."""
    parts = (data.routing, data.dev, data.alpaca)
    if callable(source):
        scorer = source

        def run(rows: list[Row]) -> Scores:
            if not rows:
                return np.zeros(0)
            return np.asarray(scorer([str(r["prompt"]) for r in rows]), dtype=np.float64)

        return run(data.routing), run(data.dev), run(data.alpaca)
    flat = np.asarray(source, dtype=np.float64)
    if flat.shape != (len(data.texts),):
        raise ValueError(f"{flat.shape[0] if flat.ndim else 0} scores; EvalData.texts has {len(data.texts)}")
    cuts = np.cumsum([len(p) for p in parts])[:-1]
    a, b, c = np.split(flat, cuts)
    return a, b, c


def evaluate(source: ScoreSource, data: EvalData, pairs: Sequence[Pair] = PAIRS) -> Evaluation:
    """Routing results for every pair and group (repo rows, then alpaca) and dev AUROC."""
    routing, dev, alpaca = _as_scores(source, data)
    results = pair_results(routing, data.routing, pairs)
    results += pair_results(alpaca, data.alpaca, pairs, alpaca=True)
    return Evaluation(routing=results, auroc=dev_auroc(dev, data.dev))


def _pct(x: float | None) -> str:
    return "-" if x is None or np.isnan(x) else f"{x:.0%}"


def _cell(r: PairResult | None) -> str:
    if r is None or r.apgr is None or r.pgr is None:
        return "-"
    return f"{r.apgr:.3f} / {r.pgr:.3f} / {_pct(r.cpt50)}"


def _short(group: str) -> str:
    return group.removeprefix("family=")


def report(
    scores_by_variant: Mapping[str, ScoreSource], data: EvalData | None = None, pairs: Sequence[Pair] = PAIRS
) -> str:
    """Markdown tables comparing scorer variants: one per pair, then dev AUROC."""
    data = data if data is not None else load_data()
    evals = {name: evaluate(src, data, pairs) for name, src in scores_by_variant.items()}
    lines = [
        f"Routing: cells are APGR / PGR@{STRONG_SHARE:.0%} strong / CPT(50%); "
        f"random router = 0.500 / {STRONG_SHARE:.3f} / 50%. Columns: group, n, mean quality gap.",
    ]
    first = next(iter(evals.values()), None)
    if first is None:
        return lines[0] + "\n"
    for pair in pairs:
        cols = [r for r in first.routing if r.pair == pair]
        if not cols:
            lines += ["", f"### {pair.name}: no rows measure both models"]
            continue
        shown = [c for c in cols if c.apgr is not None]
        skipped = [c for c in cols if c.apgr is None]
        lines += ["", f"### {pair.name}", ""]
        head = [
            f"{_short(c.group)} n={c.n} gap={c.gap:+.3f}{'!' if c.gap < SMALL_GAP else ''}" for c in shown
        ]
        lines.append("| variant | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(shown))
        for name, ev in evals.items():
            got = {(r.pair, r.group): r for r in ev.routing}
            lines.append(f"| {name} | " + " | ".join(_cell(got.get((pair, c.group))) for c in shown) + " |")
        if any(c.gap < SMALL_GAP for c in shown):
            lines += ["", f"! gap under {SMALL_GAP}: PGR divides by it, so these values are unstable"]
        if skipped:
            lines.append("")
            lines.append(
                "skipped, strong model not better on average (PGR undefined): "
                + ", ".join(f"{_short(c.group)} (n={c.n}, gap={c.gap:+.3f})" for c in skipped)
            )
    groups = list(first.auroc)
    lines += ["", "### dev AUROC (dev.jsonl.gz labels)", ""]
    lines.append("| variant | " + " | ".join(f"{_short(g)} n={first.auroc[g][0]}" for g in groups) + " |")
    lines.append("|---|" + "---|" * len(groups))
    for name, ev in evals.items():
        lines.append(f"| {name} | " + " | ".join(f"{ev.auroc[g][1]:.3f}" for g in groups) + " |")
    if data.alpaca:
        lines += ["", f"{ALPACA_NOTE}; {len(data.alpaca)} instructions"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report for the shipped (or given) model and the heuristic scorer."""
    from classifiers.heuristic import HeuristicScorer
    from classifiers.learned import LearnedScorer

    parser = argparse.ArgumentParser(prog="python -m classifiers.routing_eval", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="shared/data (for alpaca_eval)")
    args = parser.parse_args(argv)
    learned = LearnedScorer.load(args.model)
    heuristic = HeuristicScorer()
    data = load_data(args.shared)
    sys.stdout.write(report({"learned": learned.score_many, "heuristic": heuristic.score_many}, data))
    if not data.alpaca:
        sys.stdout.write(f"(no alpaca_eval set: {args.shared / 'alpaca_eval'} not found)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
