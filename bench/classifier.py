"""Latency, throughput and memory of the complexity scorer, side by side with a baseline.

    .venv/bin/python bench/classifier.py                      # current tree against a1175f9
    .venv/bin/python bench/classifier.py --baseline REF       # against another git ref
    .venv/bin/python bench/classifier.py --current HEAD       # a commit, not the working tree
    .venv/bin/python bench/classifier.py --no-baseline        # the current tree alone, in process

The baseline default, a1175f9, is the last commit with the n-gram-only scorer (artifact format
version 1). The current code cannot load that artifact, so the baseline runs from its own tree:
a temporary `git worktree` of REF in a temp dir (removed at the end). Each side runs in a worker
subprocess of the same Python with `cwd` and `PYTHONPATH` set to its tree; both workers are
pinned to the same core and stay loaded, and the parent alternates them round by round (warm-up,
then `--rounds` rounds of `--calls` single-prompt calls each), so background load falls on both.
`--current REF` runs the current side from a worktree of REF too (default: the working tree).

Per side: p50/p99 of `score_text(PROMPT)` (median over rounds), bulk `score_many` over the dev
prompts (first pass with whatever caches the scorer has cold, then warm passes), VmRSS after
loading, load time, and the `triage score --jsonl FILE --out /dev/null` CLI on the dev prompts
repeated to ~20k rows (wall time, and wall time less a one-row run's start-up).

Targets (new scorer against the old, same run): p50 ratio <= 1.5, p99 ratio <= 2, bulk >=
5,000 prompts/s, RSS <= 150 MB. It prints numbers and pass/fail words; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "a1175f9"
MODEL_REL = Path("classifiers/models/complexity.joblib")
DEV_REL = Path("classifiers/data/dev.jsonl.gz")
WARM_BULK_COPIES = 4

TARGET_P50_RATIO = 1.5
TARGET_P99_RATIO = 2.0
TARGET_BULK = 5_000.0
TARGET_RSS_MB = 150.0

PROMPT = (
    "You are given a list of transactions, each with a timestamp, an account id and an amount. "
    "Write a Python function that detects accounts whose balance goes negative at any point, "
    "assuming every account starts at zero. The function must run in O(n log n) time, must not "
    "mutate its input, and should return the account ids sorted by the first time they went "
    "negative. Explain your approach step by step, then give the code, then three unit tests "
    "using pytest that cover ties in timestamps, an empty input and an account that recovers. "
    "Finally, compare your solution with a streaming approach that processes transactions as "
    "they arrive and discuss the trade-offs in memory and latency. Constraints: 1 <= n <= 10^6, "
    "amounts are integers between -10^9 and 10^9, timestamps are ISO-8601 strings with a "
    "timezone. If two accounts go negative at the same time, order them by id. Do not use "
    "pandas. Keep the answer under 600 words and format the code in a single block with type "
    "hints and a docstring. After the tests, list two edge cases your solution does not handle "
    "and say how you would change the data model to handle them without slowing the common path."
)


class Scorer(Protocol):
    """What the bench calls on a scorer (the old and the new `LearnedScorer` both have it)."""

    def score_text(self, text: str) -> float:
        """One prompt's score."""
        ...

    def score_many(self, texts: Iterable[str]) -> list[float]:
        """Many prompts' scores."""
        ...


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc VmRSS), falling back to the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin(core: int | None) -> None:
    """Pin this process to one core, where the platform allows it."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def dev_prompts(path: Path) -> list[str]:
    """The prompts of a `.jsonl.gz` dev file (read directly: the same list for both sides)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def pct(times: list[int], q: float) -> float:
    """The q-quantile of nanosecond timings, in microseconds (nearest rank)."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1e3


# ---------------------------------------------------------------------------------------------
# Measurements (run inside a worker, or in process with --no-baseline)


def load_scorer(model: Path) -> tuple[Scorer, dict[str, Any]]:
    """Import and load the tree's `LearnedScorer`; import and load times and RSS after."""
    rss_before = rss_mb()
    start = time.perf_counter()
    import classifiers
    from classifiers.learned import LearnedScorer

    imported = time.perf_counter()
    scorer = LearnedScorer.load(model)
    loaded = time.perf_counter()
    gc.collect()
    info = {
        "module": str(Path(classifiers.__file__).parent),
        "import_ms": (imported - start) * 1e3,
        "load_ms": (loaded - imported) * 1e3,
        "rss_before_mb": rss_before,
        "rss_mb": rss_mb(),
    }
    return scorer, info


def latency_round(scorer: Scorer, calls: int, warmup: int) -> dict[str, float]:
    """p50, p99 and mean (us) of `calls` timed `score_text(PROMPT)` calls after `warmup` untimed."""
    for _ in range(warmup):
        scorer.score_text(PROMPT)
    gc.collect()
    clock = time.perf_counter_ns
    score = scorer.score_text
    times = []
    for _ in range(calls):
        start = clock()
        score(PROMPT)
        times.append(clock() - start)
    return {"p50": pct(times, 0.5), "p99": pct(times, 0.99), "mean": statistics.fmean(times) / 1e3}


def bulk_rate(scorer: Scorer, texts: list[str]) -> float:
    """Prompts per second of one `score_many` call over `texts`."""
    gc.collect()
    start = time.perf_counter()
    scorer.score_many(texts)
    return len(texts) / (time.perf_counter() - start)


def worker_main(model: Path, core: int | None) -> None:
    """Serve measurement commands, one JSON line in and one out, until `quit` or EOF."""
    # Replies go to the original stdout; anything the scorer might print goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    pin(core)
    scorer, info = load_scorer(model)
    proto.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        reply: Any
        if cmd["op"] == "latency":
            reply = latency_round(scorer, cmd["calls"], cmd["warmup"])
        elif cmd["op"] == "bulk":
            texts = dev_prompts(Path(cmd["dev"])) * cmd["copies"]
            reply = {"rate": bulk_rate(scorer, texts), "n": len(texts), "rss_mb": rss_mb()}
        else:
            return
        proto.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------------------------------------
# The parent: worktree, workers, CLI runs, table


class Worker:
    """A worker subprocess scoring with the code and artifact of one tree."""

    def __init__(self, label: str, tree: Path, core: int | None) -> None:
        self.label = label
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree / MODEL_REL)]
            + ([] if core is None else ["--core", str(core)]),
            cwd=tree,
            env=tree_env(tree),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info: dict[str, Any] = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **cmd: Any) -> Any:
        """Send one command and wait for its reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.ask_quit()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()

    def ask_quit(self) -> None:
        """Send `quit` (no reply comes)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()


def tree_env(tree: Path) -> dict[str, str]:
    """The environment for a process that must import `tree`'s code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONSTARTUP", None)
    return env


def git(*args: str) -> str:
    """Output of a git command run in the repository."""
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A temporary detached worktree of `ref`, outside the repository; removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="triage-bench-baseline-"))
    path = tmp / "tree"
    git("worktree", "add", "--detach", "--quiet", str(path), ref)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def write_cli_input(prompts: list[str], rows: int, path: Path) -> int:
    """`{id, prompt}` lines cycling through `prompts` up to at least `rows` lines; the count."""
    copies = -(-rows // len(prompts))
    with path.open("wb") as fh:
        n = 0
        for _ in range(copies):
            for p in prompts:
                fh.write(json.dumps({"id": n, "prompt": p}).encode() + b"\n")
                n += 1
    return n


def cli_seconds(tree: Path, jsonl: Path, core: int | None) -> float:
    """Wall seconds of `python -m router score --jsonl FILE --out /dev/null` in `tree`."""

    def preexec() -> None:
        pin(core)

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "router", "score", "--jsonl", str(jsonl), "--out", "/dev/null"],
        cwd=tree,
        env=tree_env(tree),
        check=True,
        preexec_fn=preexec,
    )
    return time.perf_counter() - start


def pick_core(requested: int | None) -> int | None:
    """The core to pin workers to: the one asked for, else the highest this process may use."""
    if requested is not None or not hasattr(os, "sched_getaffinity"):
        return requested
    return max(os.sched_getaffinity(0))


def verdict(ok: bool) -> str:
    """A pass/fail word."""
    return "PASS" if ok else "FAIL"


def fmt(value: float | None, spec: str) -> str:
    """A number formatted, or a dash."""
    return "-" if value is None else format(value, spec)


def run_side_by_side(args: argparse.Namespace) -> None:
    """Baseline and current tree in alternating rounds; print the table and the targets."""
    core = pick_core(args.core)
    if args.current is None:
        current = f"working tree at {git('rev-parse', '--short', 'HEAD')}"
    else:
        current = f"{args.current} ({git('rev-parse', '--short', f'{args.current}^{{commit}}')})"
    base_sha = git("rev-parse", "--short", f"{args.baseline}^{{commit}}")
    dev = REPO / DEV_REL
    prompts = dev_prompts(dev)
    print(
        f"prompt: {len(PROMPT)} chars, {len(PROMPT.split())} words, ~{len(PROMPT) // 4} tokens at "
        f"4 chars/token; dev prompts: {len(prompts)} ({DEV_REL} of the current tree, both sides)"
    )
    print(f"baseline: {args.baseline} ({base_sha}); current: {current}; pinned to core {core}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")
    with ExitStack() as stack:
        base_tree = stack.enter_context(worktree(args.baseline))
        cur_tree = REPO if args.current is None else stack.enter_context(worktree(args.current))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        sides: list[Worker] = []
        try:
            sides.append(Worker("baseline", base_tree, core))
            sides.append(Worker("current", cur_tree, core))
            for w in sides:
                print(
                    f"{w.label:>8}: {w.info['module']} import {w.info['import_ms']:.0f} ms, "
                    f"load {w.info['load_ms']:.0f} ms, RSS {w.info['rss_mb']:.1f} MB"
                )
            rounds: dict[str, list[dict[str, float]]] = {w.label: [] for w in sides}
            for w in sides:
                w.ask(op="latency", calls=args.warmup, warmup=0)
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for w in order:
                    rounds[w.label].append(w.ask(op="latency", calls=args.calls, warmup=100))
                b, c = rounds["baseline"][-1], rounds["current"][-1]
                print(
                    f"round {r + 1}: baseline p50 {b['p50']:.1f} p99 {b['p99']:.1f} us | "
                    f"current p50 {c['p50']:.1f} p99 {c['p99']:.1f} us"
                )
            bulk_cold = {w.label: w.ask(op="bulk", dev=str(dev), copies=1) for w in sides}
            warm: dict[str, list[float]] = {w.label: [] for w in sides}
            end_rss: dict[str, float] = {}
            for r in range(args.bulk_rounds):
                for w in sides if r % 2 == 0 else sides[::-1]:
                    reply = w.ask(op="bulk", dev=str(dev), copies=WARM_BULK_COPIES)
                    warm[w.label].append(reply["rate"])
                    end_rss[w.label] = reply["rss_mb"]
        finally:
            for w in sides:
                w.close()
        cli: dict[str, float | None] = {"baseline": None, "current": None}
        cli_net: dict[str, float | None] = {"baseline": None, "current": None}
        n_cli = 0
        if args.cli_rows > 0:
            big, one = Path(tmp) / "rows.jsonl", Path(tmp) / "one.jsonl"
            n_cli = write_cli_input(prompts, args.cli_rows, big)
            write_cli_input(prompts[:1], 1, one)
            walls: dict[str, list[float]] = {"baseline": [], "current": []}
            starts: dict[str, list[float]] = {"baseline": [], "current": []}
            trees = {"baseline": base_tree, "current": cur_tree}
            for r in range(args.cli_rounds):
                for label in ("baseline", "current") if r % 2 == 0 else ("current", "baseline"):
                    starts[label].append(cli_seconds(trees[label], one, core))
                    walls[label].append(cli_seconds(trees[label], big, core))
            for label in walls:
                wall, start = statistics.median(walls[label]), statistics.median(starts[label])
                cli[label] = n_cli / wall
                cli_net[label] = n_cli / (wall - start) if wall > start else None
                print(
                    f"CLI {label}: {n_cli} rows, wall {wall:.2f} s (runs: "
                    f"{', '.join(f'{x:.2f}' for x in walls[label])}), one-row start-up {start:.2f} s"
                )

    med = {
        label: {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99", "mean")}
        for label, rs in rounds.items()
    }
    rows: list[tuple[str, str, float | None, float | None, float | None]] = []

    def row(name: str, spec: str, values: Mapping[str, float | None]) -> None:
        b, c = values["baseline"], values["current"]
        rows.append((name, spec, b, c, c / b if b and c is not None else None))

    for k in ("p50", "p99", "mean"):
        row(f"single {k} (us)", ".1f", {s: med[s][k] for s in med})
    row("bulk cold pass (prompts/s)", ",.0f", {s: bulk_cold[s]["rate"] for s in bulk_cold})
    row(f"bulk warm x{WARM_BULK_COPIES} (prompts/s)", ",.0f", {s: statistics.median(warm[s]) for s in warm})
    if args.cli_rows > 0:
        row("CLI wall (prompts/s)", ",.0f", cli)
        row("CLI less start-up (prompts/s)", ",.0f", cli_net)
    row("RSS after load (MB)", ".1f", {w.label: w.info["rss_mb"] for w in sides})
    row("RSS after bulk (MB)", ".1f", end_rss)
    row("load time (ms)", ".0f", {w.label: w.info["load_ms"] for w in sides})
    row("import time (ms)", ".0f", {w.label: w.info["import_ms"] for w in sides})

    print()
    print(f"medians over {args.rounds} rounds of {args.calls} calls; bulk warm: median of {args.bulk_rounds}")
    header = f"{'':<32}{'baseline':>12}{'current':>12}{'cur/base':>10}"
    print(header)
    print("-" * len(header))
    for name, spec, base, cur, ratio in rows:
        print(f"{name:<32}{fmt(base, spec):>12}{fmt(cur, spec):>12}{fmt(ratio, '.2f'):>10}")

    p50_ratio = med["current"]["p50"] / med["baseline"]["p50"]
    p99_ratio = med["current"]["p99"] / med["baseline"]["p99"]
    cur_bulk = bulk_cold["current"]["rate"]
    cur_rss = next(w.info["rss_mb"] for w in sides if w.label == "current")
    print()
    print("targets (current):")
    print(f"  p50 ratio <= {TARGET_P50_RATIO}: {p50_ratio:.2f} {verdict(p50_ratio <= TARGET_P50_RATIO)}")
    print(f"  p99 ratio <= {TARGET_P99_RATIO}: {p99_ratio:.2f} {verdict(p99_ratio <= TARGET_P99_RATIO)}")
    bulk_ok = verdict(cur_bulk >= TARGET_BULK)
    print(f"  bulk score_many, cold pass >= {TARGET_BULK:,.0f}/s: {cur_bulk:,.0f} {bulk_ok}")
    cli_rate = cli["current"]
    if cli_rate is not None:
        cli_ok = verdict(cli_rate >= TARGET_BULK)
        print(f"  bulk CLI, wall >= {TARGET_BULK:,.0f}/s: {cli_rate:,.0f} {cli_ok} ({n_cli} rows)")
    print(f"  RSS after load <= {TARGET_RSS_MB:.0f} MB: {cur_rss:.1f} {verdict(cur_rss <= TARGET_RSS_MB)}")


def run_single(args: argparse.Namespace) -> None:
    """The current tree alone, in this process (the bench's original mode)."""
    sys.path.insert(0, str(REPO))
    pin(args.core)
    scorer, info = load_scorer(REPO / MODEL_REL)
    print(
        f"prompt: {len(PROMPT)} chars, {len(PROMPT.split())} words, "
        f"~{len(PROMPT) // 4} tokens at 4 chars/token"
    )
    latency_round(scorer, args.warmup, 0)
    rounds = [latency_round(scorer, args.calls, 100) for _ in range(args.rounds)]
    p50 = statistics.median(r["p50"] for r in rounds)
    p99 = statistics.median(r["p99"] for r in rounds)
    mean = statistics.median(r["mean"] for r in rounds)
    print(f"single: p50 {p50:.1f} us  p99 {p99:.1f} us  mean {mean:.1f} us (median of {args.rounds} rounds)")
    texts = dev_prompts(REPO / DEV_REL)
    cold = bulk_rate(scorer, texts)
    warm = bulk_rate(scorer, texts * WARM_BULK_COPIES)
    print(f"bulk: {cold:,.0f} prompts/s cold pass ({len(texts)}), {warm:,.0f} warm x{WARM_BULK_COPIES}")
    print(
        f"RSS: {info['rss_mb']:.1f} MB with the model loaded ({info['rss_mb'] - info['rss_before_mb']:.1f} "
        f"MB for import and model); load {info['load_ms']:.0f} ms, import {info['import_ms']:.0f} ms"
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the side-by-side bench, the single-side one, or a worker."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"git ref to compare (default {DEFAULT_BASELINE})"
    )
    ap.add_argument(
        "--current", default=None, help="git ref for the current side (default: the working tree as it is)"
    )
    ap.add_argument("--no-baseline", action="store_true", help="measure the current tree alone, in process")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=4000, help="timed calls per side per round")
    ap.add_argument("--warmup", type=int, default=1000, help="untimed calls per side before round 1")
    ap.add_argument("--bulk-rounds", type=int, default=3)
    ap.add_argument("--cli-rows", type=int, default=20_000, help="0 skips the CLI measurement")
    ap.add_argument("--cli-rounds", type=int, default=2)
    ap.add_argument("--core", type=int, default=None, help="core to pin to (default: the highest allowed)")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, args.core)
        return
    signal.signal(signal.SIGTERM, _terminate)
    if args.no_baseline:
        run_single(args)
    else:
        run_side_by_side(args)


if __name__ == "__main__":
    main()
