"""`triage` subcommands for the classifier: train, eval, calibrate, score.

`router/__main__.py` calls `add_subcommands`; each command's `func` takes the parsed
Namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import orjson

import classifiers
from classifiers.base import prompt_text
from classifiers.dataset import TRAIN_PATH, Row, read_jsonl

DEFAULT_MODEL = Path(classifiers.__file__).parent / "models" / "complexity.joblib"
_SCORE_BATCH = 1024


class InputError(ValueError):
    """A bad input line; the message names the file and line number."""


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `train`, `eval`, `calibrate` and `score` on a `triage` subparsers object."""
    p = subparsers.add_parser("train", help="fit the complexity classifier (deterministic)")
    p.add_argument("--out", type=Path, required=True, help="artifact path to write")
    p.add_argument("--data", type=Path, default=TRAIN_PATH, help="training rows (.jsonl[.gz])")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval", help="AUROC per source/family; APGR and CPT for routing; multi-pair routing report"
    )
    p.add_argument("--data", type=Path, required=True, help="rows with prompt and label")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("calibrate", help="threshold sending a share of requests to students")
    p.add_argument("--data", type=Path, required=True, help="a sample of prompts (.jsonl[.gz])")
    p.add_argument("--student-share", type=float, required=True)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--write-config", type=Path, default=None, help="rescale the students' max_score in this YAML file"
    )
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("score", help="score JSON lines {id, prompt|messages}")
    p.add_argument("--jsonl", type=Path, required=True, help="input, or - for stdin")
    p.add_argument("--out", type=Path, default=None, help="output (default stdout)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_score)


def _error(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    """Fit on the in-repo training rows and write the artifact."""
    from classifiers.artifact import save
    from classifiers.train import fit

    rows = list(read_jsonl(args.data))
    fitted = fit(rows)
    save(fitted.artifact, args.out)
    sys.stderr.write(f"wrote {args.out} ({len(rows)} rows)\n")
    return 0


def _load(path: Path) -> Any:
    from classifiers.learned import LearnedScorer

    return LearnedScorer.load(path)


def row_text(row: Any, where: str) -> str:
    """The prompt text of an input row: `prompt` (string) or `messages` (OpenAI list)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        return str(row["prompt"])
    messages = row.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return prompt_text(messages)
    raise InputError(f"{where}: needs a string `prompt` or a `messages` list of objects")


def _evaluation_rows(path: Path) -> list[Row]:
    rows = []
    for i, row in enumerate(read_jsonl(path), start=1):
        row["_text"] = row_text(row, f"{path}:{i}")
        rows.append(row)
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    """Print n and AUROC (and routing metrics where rows carry them) per source and family,
    then the multi-pair routing report on the in-repo dev sets (`classifiers.routing_eval`)."""
    from classifiers.metrics import auroc, routing_curve

    scorer = _load(args.model)
    rows = _evaluation_rows(args.data)
    scores = scorer.score_many(r["_text"] for r in rows)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups["all"].append(i)
        for key in ("source", "family"):
            if row.get(key) is not None:
                groups[f"{key}={row[key]}"].append(i)
    print(f"{'group':32s} {'n':>6s} {'AUROC':>6s} {'APGR':>6s} {'CPT50':>6s} {'CPT80':>6s}")
    for name in sorted(groups, key=lambda g: (g != "all", g)):
        idx = groups[name]
        lab = [i for i in idx if rows[i].get("label") is not None]
        auc = auroc([rows[i]["label"] for i in lab], [scores[i] for i in lab]) if lab else None
        cells = [f"{auc:6.3f}" if auc is not None else f"{'-':>6s}"]
        routed = [
            i
            for i in idx
            if rows[i].get("strong_score") is not None and rows[i].get("weak_score") is not None
        ]
        try:
            curve = routing_curve(
                [scores[i] for i in routed],
                [rows[i]["strong_score"] for i in routed],
                [rows[i]["weak_score"] for i in routed],
            )
            cells += [f"{curve.apgr():6.3f}", f"{curve.cpt(0.5):6.1%}", f"{curve.cpt(0.8):6.1%}"]
        except ValueError:
            cells += [f"{'-':>6s}"] * 3
        print(f"{name:32s} {len(idx):6d} " + " ".join(cells))
    # Every strong/weak pair the in-repo routing dev rows measured (plus AlpacaEval when
    # shared/data is beside the clone), for this model.
    from classifiers.routing_eval import report

    print()
    print(report({args.model.name: scorer.score_many}), end="")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Print the threshold for the asked student share; optionally rewrite config max_scores."""
    from classifiers.calibration import rewrite_max_scores, student_share, threshold_for_share

    scorer = _load(args.model)
    rows = _evaluation_rows(args.data)
    scores = scorer.score_many(r["_text"] for r in rows)
    try:
        threshold = threshold_for_share(scores, args.student_share)
    except ValueError as exc:
        return _error(str(exc))
    print(
        f"threshold {threshold:.6f} sends {student_share(scores, threshold):.1%} "
        f"of {len(scores)} prompts to students"
    )
    if args.write_config is not None:
        try:
            changes = rewrite_max_scores(args.write_config, threshold)
        except (ValueError, OSError) as exc:
            return _error(str(exc))
        for name, old, new in changes:
            print(f"{args.write_config}: {name} max_score {old:g} -> {new:g}")
    return 0


def _parsed_lines(stream: IO[bytes], name: str) -> Iterator[tuple[Any, str]]:
    """(id, text) per non-blank line; raises InputError naming the line."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise InputError(f"{where}: expected a JSON object with an `id`")
        yield row["id"], row_text(row, where)


def score_stream(scorer: Any, src: IO[bytes], dst: IO[bytes], name: str = "<input>") -> int:
    """Stream `{"id", "score"}` lines for `src`'s lines, in order, in batches; returns count."""
    lines = _parsed_lines(src, name)
    n = 0
    while batch := list(islice(lines, _SCORE_BATCH)):
        scores = scorer.score_many(text for _, text in batch)
        dst.write(
            b"".join(
                orjson.dumps({"id": i, "score": s}) + b"\n" for (i, _), s in zip(batch, scores, strict=True)
            )
        )
        n += len(batch)
    return n


def cmd_score(args: argparse.Namespace) -> int:
    """Score a JSON-lines file; exit 2 with the line number on the first bad line."""
    try:
        scorer = _load(args.model)
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    src = sys.stdin.buffer if str(args.jsonl) == "-" else args.jsonl.open("rb")
    dst = sys.stdout.buffer if args.out is None else args.out.open("wb")
    try:
        score_stream(scorer, src, dst, str(args.jsonl))
    except InputError as exc:
        return _error(str(exc))
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if dst is not sys.stdout.buffer:
            dst.close()
        else:
            dst.flush()
    return 0
