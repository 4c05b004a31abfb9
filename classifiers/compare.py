"""Model-card table: the shipped scorer against the heuristic and a TF-IDF + LR pipeline.

    python -m classifiers.compare DEV.jsonl[.gz] [ROUTING.jsonl[.gz]]

The TF-IDF baseline is fitted here on the same in-repo training rows (hard labels only).
Prints markdown: AUROC overall, per family and per source; APGR/CPT on routing rows.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classifiers.base import TextScorer
from classifiers.cli import DEFAULT_MODEL
from classifiers.dataset import TRAIN_PATH, Row, is_held_out, read_jsonl
from classifiers.heuristic import HeuristicScorer
from classifiers.learned import LearnedScorer
from classifiers.metrics import auroc, routing_curve
from classifiers.tfidf import TfidfScorer


def scorers() -> dict[str, TextScorer]:
    """The three scorers compared in the model card."""
    train = [r for r in read_jsonl(TRAIN_PATH) if r.get("label") is not None]
    return {
        "shipped": LearnedScorer.load(DEFAULT_MODEL),
        "heuristic": HeuristicScorer(),
        "tfidf+LR": TfidfScorer.fit([r["prompt"] for r in train], [r["label"] for r in train]),
    }


def _groups(rows: Sequence[Row]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for key in ("family", "source"):
        for i, r in enumerate(rows):
            groups.setdefault(f"{key}={r[key]}", []).append(i)
    return groups


def auroc_table(rows: Sequence[Row], scores: dict[str, list[float]]) -> str:
    """Markdown table of n and AUROC per group, one column per scorer."""
    names = list(scores)
    out = ["| group | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, idx in _groups(rows).items():
        y = [rows[i]["label"] for i in idx]
        cells = [f"{auroc(y, [scores[n][i] for i in idx]):.3f}" for n in names]
        out.append(f"| {group} | {len(idx)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def routing_table(rows: Sequence[Row], scores: dict[str, list[float]]) -> str:
    """Markdown table of APGR, CPT(50%), CPT(80%) per group and scorer."""
    out = ["| group | n | scorer | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|---|"]
    for group, idx in _groups(rows).items():
        for name, s in scores.items():
            curve = routing_curve(
                [s[i] for i in idx],
                [rows[i]["strong_score"] for i in idx],
                [rows[i]["weak_score"] for i in idx],
            )
            out.append(
                f"| {group} | {len(idx)} | {name} | {curve.apgr():.3f} | "
                f"{curve.cpt(0.5):.1%} | {curve.cpt(0.8):.1%} |"
            )
    return "\n".join(out)


def main(argv: Sequence[str]) -> None:
    """Print the AUROC table for argv[0] and, if given, the routing table for argv[1]."""
    models = scorers()
    dev = [r for r in read_jsonl(Path(argv[0])) if r.get("label") is not None and not is_held_out(r)]
    scores = {n: m.score_many(r["prompt"] for r in dev) for n, m in models.items()}
    sys.stdout.write(auroc_table(dev, scores) + "\n\n")
    if len(argv) > 1:
        routing = list(read_jsonl(Path(argv[1])))
        rs = {n: m.score_many(r["prompt"] for r in routing) for n, m in models.items()}
        sys.stdout.write(routing_table(routing, rs) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
