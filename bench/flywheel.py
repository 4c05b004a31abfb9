"""The learning flywheel, end to end: simulated traffic through `triage serve`, then `triage learn`.

For each student model, prompts come from the in-repo labelled rows whose outcome for that
model is measured (`classifiers/data/*.jsonl.gz`, `outcomes`; see PROVENANCE.md there: no
GSM8K-test, MMLU-test or MT-Bench rows): RouterBench ARC-C / MBPP / WinoGrande with 0/1
correctness of 11 models, RouterDC GSM8K-train / MATH-prealgebra / ARC-E / MBPP / HumanEval(-JS)
with 7 small models' scores. The traffic is drawn from the training split; the unseen
prompts it is judged on are the dev split (never trained on by the shipped model, never sent
through the gateway here).

Two fake upstreams (real HTTP, OpenAI chat protocol) answer each prompt with a reference
answer or a plausible wrong one: a letter for multiple choice ("(B)" vs "(C)"), a final number
otherwise ("The answer is 417." vs "... 418."). The teacher is always right; the student is
right with its measured outcome (0/1, or RouterDC's share of correct samples, drawn per
request). So the gateway's shadow comparison (`router.shadow.agreement`) tells them apart.

The gateway routes with the shipped classifier at the threshold that sends `--share` of the
traffic to the student, shadows `--shadow-rate` of the student's answers on the teacher,
explores `--explore-rate` of the teacher's (asks the student too, `routing.explore_rate`),
and stores every request with its prompt (SQLite, `capture: {enabled: true}`). Then:
- the learning curve: labels from the first k stored requests, refit, APGR on the unseen
  prompts (teacher quality 1, student quality = its measured outcome);
- `triage learn --write-config` on the whole store, then `POST /admin/reload`: the running
  gateway scores with the new model without a restart (checked on one prompt);
- answer quality at a 70% student share, before and after.

    .venv/bin/python bench/flywheel.py                    # 4 students, 20,000 requests each
    .venv/bin/python bench/flywheel.py --students mistral-7b --requests 2000 --no-plot
    .venv/bin/python bench/flywheel.py --students claude-v2,yi-34b-chat --explore-rate 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from classifiers import learn as L
from classifiers.calibration import threshold_for_share
from classifiers.dataset import DEV_PATH, TRAIN_PATH, read_jsonl
from classifiers.learned import LearnedScorer
from classifiers.metrics import auroc, routing_curve
from router.config import StoreConfig
from router.store import read_traffic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the tests' loopback servers live beside bench/
from tests.loopback import serve, triage_process  # noqa: E402

SHIPPED = REPO / "classifiers" / "models" / "complexity.joblib"
# Student model key -> the source whose rows measured it.
STUDENTS: dict[str, str] = {
    "mistral-7b": "routerbench",
    "llama-3-8b-base": "routerdc_small7",
    "claude-v1": "routerbench",
    "claude-v2": "routerbench",
    "yi-34b-chat": "routerbench",
}
DEFAULT_STUDENTS = ("mistral-7b", "llama-3-8b-base", "claude-v1", "claude-v2")
_MC_BENCHES = frozenset({"arc-challenge", "arc_easy", "arc_challenge", "winogrande"})
CHECKPOINTS = (1000, 2000, 5000, 10000, 20000)


@dataclass(frozen=True)
class Item:
    """One prompt and how well the student does on it (probability its answer is right)."""

    prompt: str
    p_right: float
    mc: bool

    def reference(self) -> str:
        h = int.from_bytes(hashlib.sha1(self.prompt.encode()).digest()[:4], "big")
        return f"({'ABCD'[h % 4]})" if self.mc else f"The answer is {h % 1000}."

    def wrong(self) -> str:
        h = int.from_bytes(hashlib.sha1(self.prompt.encode()).digest()[:4], "big")
        return (
            f"({'ABCD'[(h + 1 + h // 4 % 3) % 4]})" if self.mc else f"The answer is {h % 1000 + 1 + h % 7}."
        )


def items(path: Path, student: str) -> list[Item]:
    """The rows of `path` from the student's source with its outcome measured."""
    out = []
    for row in read_jsonl(path):
        q = (row.get("outcomes") or {}).get(student)
        if row.get("source") != STUDENTS[student] or q is None:
            continue
        mc = str(row.get("bench")) in _MC_BENCHES
        # RouterDC multiple choice: the probability of the right choice when it won, else 0.
        out.append(Item(str(row["prompt"]), (1.0 if q > 0 else 0.0) if mc else float(q), mc))
    return out


# --------------------------------------------------------------------------- fake upstreams


def fake_model(name: str, by_prompt: dict[str, Item], always_right: bool, seed: int) -> Starlette:
    """An OpenAI chat upstream that answers right with each prompt's probability (or always)."""
    rng = random.Random(seed)

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        item = by_prompt.get(prompt)
        if item is None:
            text = "I cannot find that question."
        elif always_right or rng.random() < item.p_right:
            text = item.reference()
        else:
            text = item.wrong()
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 6, "total_tokens": 0},
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# --------------------------------------------------------------------------- the gateway


def gateway_config(
    student_url: str,
    teacher_url: str,
    max_score: float,
    shadow_rate: float,
    data_dir: Path,
    explore_rate: float = 0.0,
) -> dict[str, Any]:
    """Student and teacher on the fakes, the shipped model, shadowing, exploring, a store of every prompt."""
    return {
        "admin": {"reload_endpoint": True},
        "models": [
            {
                "name": "student",
                "role": "student",
                "endpoints": [student_url + "/v1"],
                "upstream_model": "s",
                "max_score": round(max_score, 6),
                "max_connections": 256,
            },
            {
                "name": "teacher",
                "role": "teacher",
                "endpoints": [teacher_url + "/v1"],
                "upstream_model": "t",
                "max_connections": 256,
            },
        ],
        "classifier": {"path": str(SHIPPED)},
        "routing": {"shadow_rate": shadow_rate, "explore_rate": explore_rate, "shadow_max_concurrency": 256},
        "store": {"kind": "sqlite", "data_dir": str(data_dir), "flush_interval_s": 0.2},
        "capture": {"enabled": True, "sample_rate": 1.0},
    }


async def send_traffic(url: str, prompts: Sequence[str], concurrency: int = 32) -> int:
    """POST every prompt with `model: auto`; return how many got a 200."""
    ok = 0
    queue = iter(prompts)
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            nonlocal ok
            for prompt in queue:
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
                )
                ok += r.status_code == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


# --------------------------------------------------------------------------- measuring


@dataclass
class Point:
    """The learning curve at one point: requests seen, labels, and routing quality on unseen prompts."""

    requests: int
    labels: int
    hard: int
    apgr: float
    pgr_at_30: float
    auroc: float


@dataclass
class StudentResult:
    student: str
    source: str
    requests: int
    shadow_rate: float
    share: float
    traffic_prompts: int
    test_prompts: int
    test_gap: float  # teacher minus student mean quality on the unseen prompts
    before: dict[str, float]
    after: dict[str, float]
    curve: list[Point] = field(default_factory=list)
    gain_shows_at: int | None = None  # requests seen when APGR first rose by >= 0.02
    target_at: int | None = None  # ... and by >= 0.05
    answered: int = 0
    learn_status: int = 0  # `triage learn`'s exit code
    learn_output: str = ""
    reload_applied: bool = False
    probe_scores: tuple[float | None, float | None] = (None, None)  # before and after the reload
    explore_rate: float = 0.0


def judge(scores: Sequence[float] | np.ndarray, test: Sequence[Item]) -> dict[str, float]:
    """APGR, PGR and answer quality with 30% on the teacher, AUROC (hard = mean outcome < 0.5)."""
    weak = np.array([t.p_right for t in test])
    curve = routing_curve(scores, np.ones(len(test)), weak)
    pgr = curve.pgr_at(0.3)
    quality = float(weak.mean() + pgr * (1.0 - weak.mean()))
    hard = (weak < 0.5).astype(float)
    return {
        "apgr": curve.apgr(),
        "pgr_at_30": pgr,
        "quality_at_70_student": quality,
        "auroc": auroc(hard, scores),
    }


def learning_curve(
    store: StoreConfig, test: Sequence[Item], checkpoints: Sequence[int], student_name: str
) -> tuple[list[Point], float]:
    """Refit on the labels of the first k stored requests for each checkpoint k."""
    import joblib

    artifact = joblib.load(SHIPPED)
    scorer = LearnedScorer(artifact)
    stored = sorted(read_traffic(store), key=lambda r: r.ts)
    d_test = L.design(scorer, artifact, [t.prompt for t in test])
    base = judge(d_test.base, test)["apgr"]
    points = []
    for k in checkpoints:
        if k > len(stored):
            break
        examples, _ = L.label_traffic(((r, r.shadows) for r in stored[:k]), L.LabelRule(student=student_name))
        hard = sum(e.label for e in examples)
        if min(hard, len(examples) - hard) < L.MIN_PER_CLASS:
            points.append(Point(k, len(examples), hard, base, float("nan"), float("nan")))
            continue
        refit = L.fit_examples(scorer, artifact, examples)
        got = judge(refit.delta.decision(d_test), test)
        points.append(Point(k, len(examples), hard, got["apgr"], got["pgr_at_30"], got["auroc"]))
        print(
            f"  {k:6d} requests, {len(examples):5d} labels ({hard} hard): APGR {got['apgr']:.3f}", flush=True
        )
    return points, base


def run_student(
    student: str,
    requests: int,
    shadow_rate: float,
    share: float,
    seed: int,
    work: Path,
    checkpoints: Sequence[int] = CHECKPOINTS,
    explore_rate: float = 0.0,
) -> StudentResult:
    """Traffic through the gateway, the learning curve, `triage learn` and a reload, for one student."""
    traffic, test = items(TRAIN_PATH, student), items(DEV_PATH, student)
    by_prompt = {t.prompt: t for t in traffic + test}
    shipped = LearnedScorer.load(SHIPPED)
    threshold = threshold_for_share(shipped.score_many([t.prompt for t in traffic]), share)
    rng = random.Random(seed)
    stream = [rng.choice(traffic).prompt for _ in range(requests)]
    data_dir = work / "store"
    config_path = work / "config.yaml"
    with (
        serve(fake_model("student", by_prompt, False, seed)) as student_url,
        serve(fake_model("teacher", by_prompt, True, seed)) as teacher_url,
    ):
        config = gateway_config(student_url, teacher_url, threshold, shadow_rate, data_dir, explore_rate)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with triage_process(config_path, log=work / "gateway.log") as served:
            url = served.url
            started = time.monotonic()
            ok = asyncio.run(send_traffic(url, stream))
            print(f"{student}: {ok}/{requests} answered in {time.monotonic() - started:.0f} s", flush=True)
            time.sleep(1.5)  # shadow calls finish, the store's writer flushes
            probe = max(test, key=lambda t: t.p_right).prompt
            before_score = _route_score(url, probe)
            learned = work / "learned.joblib"
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "router",
                    "learn",
                    "--config",
                    str(config_path),
                    "--out",
                    str(learned),
                    "--student",
                    "student",
                    "--student-share",
                    str(share),
                    "--write-config",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            print(out.stdout + out.stderr, flush=True)
            reloaded = (
                httpx.post(url + "/admin/reload", timeout=60).status_code == 200
                if out.returncode == 0
                else False
            )
            after_score = _route_score(url, probe) if reloaded else None
            print(
                f"reload applied: {reloaded}; probe prompt scored {before_score} before, {after_score} after"
            )
        store = StoreConfig(kind="sqlite", data_dir=data_dir)
        curve, base_apgr = learning_curve(store, test, [c for c in checkpoints if c <= requests], "student")
    before = judge(shipped.score_many([t.prompt for t in test]), test)
    after = (
        judge(LearnedScorer.load(learned).score_many([t.prompt for t in test]), test)
        if out.returncode == 0
        else {}
    )
    weak = np.array([t.p_right for t in test])
    return StudentResult(
        student=student,
        source=STUDENTS[student],
        requests=requests,
        shadow_rate=shadow_rate,
        share=share,
        traffic_prompts=len(traffic),
        test_prompts=len(test),
        test_gap=float(1 - weak.mean()),
        before=before,
        after=after,
        curve=curve,
        gain_shows_at=next((p.requests for p in curve if p.apgr >= base_apgr + 0.02), None),
        target_at=next((p.requests for p in curve if p.apgr >= base_apgr + 0.05), None),
        answered=ok,
        learn_status=out.returncode,
        learn_output=out.stdout,
        reload_applied=reloaded,
        probe_scores=(before_score, after_score),
        explore_rate=explore_rate,
    )


def load_result(raw: dict[str, Any]) -> StudentResult:
    """A result saved with `--json` (the first-gain points recomputed from its curve)."""
    known = {
        f for f in StudentResult.__dataclass_fields__ if f not in ("curve", "gain_shows_at", "target_at")
    }
    res = StudentResult(**{k: v for k, v in raw.items() if k in known})
    res.curve = [Point(**p) for p in raw["curve"]]
    base = res.before["apgr"]
    res.gain_shows_at = next((p.requests for p in res.curve if p.apgr >= base + 0.02), None)
    res.target_at = next((p.requests for p in res.curve if p.apgr >= base + 0.05), None)
    return res


def _at(requests: int | None) -> str:
    return "never" if requests is None else str(requests)


def _route_score(url: str, prompt: str) -> float | None:
    """The score the running gateway gives a prompt (its `x-triage-score` header)."""
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
        timeout=30,
    )
    value = r.headers.get("x-triage-score")
    return None if value is None else float(value)


def plot(results: Sequence[StudentResult], path: Path) -> None:
    """APGR against labelled outcomes and against requests seen, one line per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for res in results:
        xs_l = [0] + [p.labels for p in res.curve]
        xs_r = [0] + [p.requests for p in res.curve]
        ys = [res.before["apgr"]] + [p.apgr for p in res.curve]
        line = axes[0].plot(xs_l, ys, marker="o", ms=3, label=f"{res.student} ({res.source})")[0]
        axes[1].plot(xs_r, ys, marker="o", ms=3, color=line.get_color())
        for ax in axes:
            ax.axhline(res.before["apgr"] + 0.05, color=line.get_color(), ls=":", lw=0.8)
        if res.gain_shows_at is not None:
            axes[1].axvline(res.gain_shows_at, color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_xlabel("labelled outcomes (shadow and explore comparisons, escalations)")
    axes[1].set_xlabel("requests seen")
    axes[0].set_ylabel("APGR on unseen prompts")
    axes[0].legend(fontsize=8)
    rate = results[0].shadow_rate
    explore = (
        f", explore rate {results[0].explore_rate:.0%} of teacher answers" if results[0].explore_rate else ""
    )
    fig.suptitle(
        f"Learning from traffic: shadow rate {rate:.0%} of student answers{explore}, "
        f"{results[0].share:.0%} student share\n"
        "(dotted: shipped + 0.05; dashed: first point 0.02 above shipped)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--students", default=",".join(DEFAULT_STUDENTS), help=f"comma-separated, of: {', '.join(STUDENTS)}"
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    parser.add_argument(
        "--explore-rate", type=float, default=0.0, help="share of teacher answers also asked of the student"
    )
    parser.add_argument("--share", type=float, default=0.7, help="student share the router is set to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "flywheel.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--from-json", type=Path, help="print and plot saved results instead of running")
    args = parser.parse_args(argv)
    results = []
    if args.from_json:
        results = [load_result(r) for r in json.loads(args.from_json.read_text())]
        args.shadow_rate, args.requests, args.share, args.explore_rate = (
            results[0].shadow_rate,
            results[0].requests,
            results[0].share,
            results[0].explore_rate,
        )
    for student in [] if args.from_json else args.students.split(","):
        with tempfile.TemporaryDirectory(prefix="triage-flywheel-") as tmp:
            results.append(
                run_student(
                    student,
                    args.requests,
                    args.shadow_rate,
                    args.share,
                    args.seed,
                    Path(tmp),
                    explore_rate=args.explore_rate,
                )
            )
    print(
        f"\nshadow rate {args.shadow_rate:.0%}, explore rate {args.explore_rate:.0%}, "
        f"{args.requests} requests per student, "
        f"router at {args.share:.0%} student share"
    )
    print(
        f"{'student':18s} {'APGR before':>11s} {'after':>6s} {'gain':>6s} "
        f"{'AUROC before':>12s} {'after':>6s} "
        f"{'quality@70% before':>18s} {'after':>6s} {'+0.02 at':>9s} {'+0.05 at':>9s}"
    )
    for r in results:
        b, a = (
            r.before,
            r.after or {"apgr": float("nan"), "auroc": float("nan"), "quality_at_70_student": float("nan")},
        )
        print(
            f"{r.student:18s} {b['apgr']:11.3f} {a['apgr']:6.3f} {a['apgr'] - b['apgr']:+6.3f} "
            f"{b['auroc']:12.3f} "
            f"{a['auroc']:6.3f} {b['quality_at_70_student']:18.3f} {a['quality_at_70_student']:6.3f} "
            f"{_at(r.gain_shows_at):>9s} {_at(r.target_at):>9s}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if not args.no_plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
