"""`triage learn`: refit the router on this student's outcomes in the traffic store.

Reads the stored requests (`store:`), labels them (`classifiers.learn.label_traffic`:
escalated by a quality check or disagreeing with the teacher in shadow -> hard, agreeing
-> easy), holds out a fifth of the labelled prompts to report AUROC and APGR before and
after, refits on all the labels, writes the new artifact and the student thresholds that
send the target share of the captured prompts to students. With `--write-config` the
config then names the new artifact and thresholds: `POST /admin/reload` (or SIGHUP) swaps
them in without a restart.

Only requests whose prompt was captured can be labelled: turn `capture:` on (with
`sample_rate` 1.0, or at least for the shadowed and escalated requests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from classifiers import learn as L

__all__ = ["add_subcommand"]

# A fifth of the labelled prompts is held out for the before/after report.
_HOLDOUT_FOLDS = 5
# Fewer captured prompts than this make the threshold a rough guess; say so.
_FEW_PROMPTS = 200


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `triage learn`."""
    from router.__main__ import DEFAULT_CONFIG
    from router.workload import add_store_command

    p = add_store_command(
        sub, "learn", "refit the router on this student's outcomes in the traffic store", __doc__
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="the config naming the store and model"
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the new model artifact")
    p.add_argument("--student", help="learn this student's outcomes (default: every student's)")
    p.add_argument("--hard-below", type=float, default=0.5, help="shadow agreement below this is hard")
    p.add_argument("--easy-from", type=float, default=0.8, help="shadow agreement from this is easy")
    p.add_argument(
        "--student-share",
        type=float,
        help="share of requests the new thresholds send to students (default: "
        "routing.target_student_share, else the share the stored traffic saw)",
    )
    p.add_argument(
        "--write-config",
        action="store_true",
        help="point the config at the new model and rescale the students' max_score",
    )
    p.set_defaults(func=_run)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _error(message: str) -> int:
    sys.stderr.write(f"triage learn: {message}\n")
    return 2


def _run(args: argparse.Namespace) -> int:
    from router.store import read_traffic
    from router.workload import load_stored

    config = load_stored(args.config)
    if config is None or config.store is None:
        return 2
    if config.classifier.kind != "learned" or config.classifier.path is None:
        return _error("the config's classifier is not a learned model; learning starts from one")
    try:
        rule = L.LabelRule(args.hard_below, args.easy_from, args.student)
    except ValueError as exc:
        return _error(str(exc))
    requests = list(read_traffic(config.store, args.since, args.until))
    examples, counts = L.label_traffic(((r, r.shadows) for r in requests), rule)
    _say(_describe_counts(counts))
    hard = sum(e.label for e in examples)
    if min(hard, len(examples) - hard) < L.MIN_PER_CLASS:
        return _error(
            f"need at least {L.MIN_PER_CLASS} hard and {L.MIN_PER_CLASS} easy labels, have "
            f"{hard} and {len(examples) - hard}: shadow more requests (routing.shadow_rate) or wait"
        )
    students = {m.name for m in config.students}
    share = _target_share(args.student_share, config.routing.target_student_share, requests, students)
    prompts = [r.prompt for r in requests if r.prompt and r.score is not None]
    result = L.learn(config.classifier.path, examples, prompts, share, _HOLDOUT_FOLDS)
    _say(result.report())
    from classifiers.artifact import save

    save(result.artifact, args.out)
    _say(f"wrote {args.out}")
    if len(prompts) < _FEW_PROMPTS:
        sys.stderr.write(f"warning: only {len(prompts)} captured prompts to set the threshold on\n")
    if args.write_config:
        return _write_config(args.config, args.out, result.threshold)
    return 0


def _target_share(
    asked: float | None, configured: float | None, requests: list[Any], students: set[str]
) -> float:
    """The share asked for, else the configured target, else what the stored traffic saw."""
    if asked is not None:
        return asked
    if configured is not None:
        return configured
    scored = [r for r in requests if r.score is not None and r.attempted]
    return sum(r.attempted[0] in students for r in scored) / len(scored) if scored else 0.7


def _describe_counts(c: L.LabelCounts) -> str:
    return (
        f"{c.labelled} labels from {c.requests} stored requests: "
        f"{c.hard_quality} hard by a quality check, {c.hard_shadow} hard and {c.easy_shadow} easy by shadow "
        f"({c.between} shadow comparisons in between, {c.no_prompt} without a captured prompt, "
        f"{c.other_student} for other students)"
    )


def _write_config(path: Path, model: Path, threshold: float) -> int:
    from classifiers.calibration import rewrite_max_scores

    try:
        L.point_classifier(path, model)
        changes = rewrite_max_scores(path, threshold)
    except (ValueError, OSError) as exc:
        return _error(str(exc))
    _say(f"{path}: classifier path -> {model}")
    for name, old, new in changes:
        _say(f"{path}: {name} max_score {old:g} -> {new:g}")
    _say("apply it with POST /admin/reload (or SIGHUP)")
    return 0
