"""The `triage` command line: serve the gateway, check a config, try a routing decision."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.config import Config, ConfigError, config_hash, load_config
from router.logs import configure as configure_logs

if TYPE_CHECKING:
    from classifiers import Scorer
    from router.routing import ThresholdPolicy

DEFAULT_CONFIG = Path("config.yaml")


def _load(path: Path, *, secrets_needed: bool = True) -> Config | None:
    """The config, or None after printing why not.

    Commands that never call an upstream pass `secrets_needed=False`: an unset secret
    variable is then a warning, so a config can be checked where its secrets are not.
    """
    missing: list[str] | None = None if secrets_needed else []
    try:
        config = load_config(path, missing_secrets=missing)
    except ConfigError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return None
    if missing:
        print(
            f"triage: warning: {path}: secrets not set here (needed by `triage serve`):\n"
            + "\n".join(missing),
            file=sys.stderr,
        )
    return config


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    import uvicorn

    from router.app import create_app
    from router.metrics import MULTIPROC_ENV
    from router.server import configure_protocol

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    configure_logs(args.log_format or config.server.log_format, args.log_level)
    if not config.server.access_log:
        logging.getLogger("triage.access").setLevel(logging.WARNING)
    try:
        app = create_app(config, config_hash=config_hash(args.config), config_path=args.config)
    except (OSError, ValueError) as exc:
        print(f"triage: cannot load the classifier: {exc}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": args.access_log,
        "log_config": None,  # the gateway's own handlers and format (router/logs.py)
        "loop": "uvloop",
        "http": configure_protocol(config),
        "timeout_graceful_shutdown": args.drain_timeout_s,
    }
    if args.workers > 1:
        # Each worker process builds its own app from the config named in the environment;
        # metrics go through prometheus-client's multiprocess files so /metrics shows the
        # sum over workers, whichever worker answers the scrape.
        metrics_dir = Path(tempfile.mkdtemp(prefix="triage-metrics-"))
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        os.environ["TRIAGE_CONFIG"] = str(args.config.resolve())
        os.environ["TRIAGE_LOG_FORMAT"] = args.log_format or config.server.log_format
        os.environ["TRIAGE_LOG_LEVEL"] = args.log_level
        try:
            uvicorn.run("router.app:app_from_env", factory=True, workers=args.workers, **options)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    uvicorn.run(app, **options)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.config, secrets_needed=False)
    if config is None:
        return 2
    students = ", ".join(f"{m.name} (<{m.max_score})" for m in config.students) or "none"
    print(
        f"{args.config}: OK — teacher {config.teacher.name}; students {students}; "
        f"classifier {config.classifier.kind}"
    )
    return 0


def _route(args: argparse.Namespace) -> int:
    config = _load(args.config, secrets_needed=False)
    if config is None:
        return 2
    from classifiers import load_scorer
    from router.policy import RequestContext
    from router.routing import ThresholdPolicy

    scorer = load_scorer(config.classifier.kind, config.classifier.path)
    router = ThresholdPolicy(config)
    score = scorer.score_text(args.text)
    ctx = RequestContext(
        "chat", config.routing.alias, None, score, router.estimate_tokens(len(args.text)), frozenset(), None
    )
    decision = router.decide(ctx)
    print(f"score {score:.3f} -> {decision.model.name} ({decision.reason})")
    if args.explain:
        _explain(args.text, scorer, config, router)
    return 0


def _explain(text: str, scorer: Scorer, config: Config, router: ThresholdPolicy) -> None:
    """The policy's thresholds and, for a learned scorer, the features behind the score."""
    from classifiers.explain import explain, format_explanation
    from classifiers.learned import LearnedScorer

    bounds = ", ".join(f"{m.name} below {router.controller.threshold(m.name):.3f}" for m in config.students)
    print(f"policy: {bounds or 'no students'}; otherwise {config.teacher.name}")
    if not isinstance(scorer, LearnedScorer):
        print(f"the {scorer.name} scorer has no feature breakdown")
        return
    # Cues read as "compared with the average training prompt".
    print(format_explanation(explain(scorer, text, cue_mean=scorer.cue_mean)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="triage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="also log uvicorn's own access lines (the gateway logs one line per "
        "completion request already; see server.access_log)",
    )
    serve.add_argument(
        "--log-format", choices=["plain", "json"], help="log line format (default: server.log_format, plain)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes (metrics are aggregated across them)"
    )
    serve.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, wait this long for in-flight requests",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", type=Path)
    check.set_defaults(func=_check_config)

    route = sub.add_parser("route", help="print the score and the model a prompt would get")
    route.add_argument("text")
    route.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    route.add_argument(
        "--explain",
        action="store_true",
        help="also print the policy's thresholds and the features that pushed the score up and down",
    )
    route.set_defaults(func=_route)

    from router.export import add_subcommand as add_export
    from router.render import add_subcommand as add_render
    from router.replay import add_subcommand as add_replay
    from router.stats import add_subcommand as add_stats

    add_stats(sub)
    add_render(sub)
    add_export(sub)
    add_replay(sub)
    from classifiers.learn_cli import add_subcommand as add_learn

    add_learn(sub)
    try:
        from classifiers.cli import add_subcommands
    except ImportError:  # pragma: no cover - the classifier CLI ships with the package
        pass
    else:
        add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `triage` command."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
