"""Labelled prompt rows: the in-repo copies, how they were cut from shared/data, and readers.

The shipped model trains only on rows copied into `classifiers/data/` (see PROVENANCE.md there),
so `triage train` reproduces it without the shared folder. `build_repo_data` made those copies:

    python -m classifiers.dataset /work/shared/data

Rows from sources that measured several models on the same prompt also carry `outcomes`:
model key (`MODEL_KEYS`) -> quality in [0, 1] (RouterBench 0/1 correctness, arena-bench GPT-4
judge score / 10, RouterDC's per-question score), so routing can be judged for any strong/weak pair.

Rules it applies (the licence and held-out rules in shared/data/README.md):
- no CC BY-NC rows (`alpaca_eval`, `alpaca_seed`) anywhere in the repo;
- no GSM8K-test or MMLU-test items. The shared files still hold RouterDC rows with
  `source_id` `gsm8k/test/...` and `mmlu/...`; RouterDC's "mmlu_train" is itself cut from
  the MMLU test split (e.g. "What is a replay attack?"), so every RouterDC MMLU row is dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
TRAIN_PATH = DATA_DIR / "train.jsonl.gz"
DEV_PATH = DATA_DIR / "dev.jsonl.gz"
ROUTING_DEV_PATH = DATA_DIR / "routing_dev.jsonl.gz"
SAMPLE_PATH = DATA_DIR / "sample.jsonl"

NON_COMMERCIAL_SOURCES = frozenset({"alpaca_eval", "alpaca_seed"})
_KEEP = ("id", "source", "family", "bench", "prompt", "label", "target")

Row = dict[str, Any]
Outcomes = dict[str, float]

# Short stable keys for the models whose per-prompt quality rows carry in `outcomes`, declared
# once: the name each shared/data source uses -> key. One model under two sources' names
# (RouterBench "mistralai/mixtral-8x7b-chat", arena "Mixtral-8x7B-Instruct-v0.1") shares a key.
MODEL_KEYS: dict[str, dict[str, str]] = {
    # routerbench_subset: 0/1 correctness.
    "routerbench": {
        "gpt-4-1106-preview": "gpt-4-1106-preview",
        "gpt-3.5-turbo-1106": "gpt-3.5-turbo-1106",
        "claude-v1": "claude-v1",
        "claude-v2": "claude-v2",
        "claude-instant-v1": "claude-instant-v1",
        "meta/llama-2-70b-chat": "llama-2-70b-chat",
        "mistralai/mixtral-8x7b-chat": "mixtral-8x7b",
        "zero-one-ai/Yi-34B-Chat": "yi-34b-chat",
        "meta/code-llama-instruct-34b-chat": "code-llama-34b-instruct",
        "WizardLM/WizardLM-13B-V1.2": "wizardlm-13b",
        "mistralai/mistral-7b-chat": "mistral-7b",
    },
    # arena_bench_v1: GPT-4 judge score 1-10 (against a GPT-4 reference), divided by 10.
    "arena_bench_v1": {
        "gpt-4-1106-preview": "gpt-4-1106-preview",
        "gpt-4-0314": "gpt-4-0314",
        "gpt-3.5-turbo-1106": "gpt-3.5-turbo-1106",
        "gpt-3.5-turbo": "gpt-3.5-turbo",
        "claude-1": "claude-v1",
        "claude-2": "claude-v2",
        "claude-2.1": "claude-2.1",
        "claude-instant-1": "claude-instant-v1",
        "Llama-2-70b-chat": "llama-2-70b-chat",
        "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
        "vicuna-33b-v1.3": "vicuna-33b",
        "palm-2-chat-bison-001": "palm-2-chat-bison",
        "llama-13b": "llama-13b",
        "openchat_3.5": "openchat-3.5",
        "Starling-LM-7B-alpha": "starling-7b-alpha",
        "mistralai/Mistral-7B-Instruct-v0.1": "mistral-7b",
    },
    # routerdc_small7: share of samples correct (generation), or the normalised probability of
    # the right choice when it is the argmax, else 0 (multiple choice).
    "routerdc_small7": {
        "mistralai/Mistral-7B-v0.1": "mistral-7b-base",
        "meta-math/MetaMath-Mistral-7B": "metamath-mistral-7b",
        "itpossible/Chinese-Mistral-7B-v0.1": "chinese-mistral-7b",
        "HuggingFaceH4/zephyr-7b-beta": "zephyr-7b-beta",
        "cognitivecomputations/dolphin-2.6-mistral-7b": "dolphin-2.6-mistral-7b",
        "meta-llama/Meta-Llama-3-8B": "llama-3-8b-base",
        "cognitivecomputations/dolphin-2.9-llama3-8b": "dolphin-2.9-llama3-8b",
    },
}
MODELS: tuple[str, ...] = tuple(sorted({key for names in MODEL_KEYS.values() for key in names.values()}))


def read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a `.jsonl` or `.jsonl.gz` file, one dict per non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl_gz(path: Path, rows: Iterable[Row]) -> int:
    """Write rows as gzip JSON lines with a fixed header (same rows -> same bytes)."""
    buf = io.BytesIO()
    # mtime=0 and no file name keep the gzip header free of the build time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        n = 0
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode())
            n += 1
    path.write_bytes(buf.getvalue())
    return n


def is_held_out(row: Row) -> bool:
    """True for rows drawn from GSM8K test or MMLU test (never trained or tuned on)."""
    source_id = str(row.get("source_id", ""))
    return row.get("source") == "routerdc_small7" and (source_id.startswith(("gsm8k/test", "mmlu/")))


def is_shippable(row: Row) -> bool:
    """True for rows the repo may hold: commercial-use licence and not a held-out benchmark."""
    return row.get("source") not in NON_COMMERCIAL_SOURCES and not is_held_out(row)


def _quality(value: Any, scale: float = 1.0) -> float | None:
    """A source's score as a quality in [0, 1] rounded to 4 decimals; None when missing."""
    if value is None or value == "":
        return None
    q = float(value) / scale
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"score {value!r} / {scale} is outside [0, 1]")
    return round(q, 4)


def _keyed(source: str, scores: Mapping[str, Any], scale: float = 1.0, every: bool = False) -> Outcomes:
    """Scores under their model keys; with `every`, a model missing from MODEL_KEYS is an error."""
    names = MODEL_KEYS[source]
    if every and (unknown := sorted(set(scores) - set(names))):
        raise ValueError(f"{source}: models without a key in MODEL_KEYS: {unknown}")
    out = {names[m]: q for m, v in scores.items() if m in names and (q := _quality(v, scale)) is not None}
    return dict(sorted(out.items()))


def _routerbench_outcomes(shared: Path) -> dict[str, Outcomes]:
    """`routerbench:<sample_id>` -> outcomes. 14 sample ids appear twice: a row with a different
    prompt and only gpt-3.5-turbo-1106 scored, and the row the labels came from (gpt-4 and
    mistral-7b scored, gpt-3.5 missing); only the latter is this id's prompt."""
    out: dict[str, Outcomes] = {}
    path = shared / "routerbench_subset" / "routerbench_arc_mbpp_winogrande.jsonl.gz"
    for r in read_jsonl(path):
        if r.get("gpt-4-1106-preview") is None or r.get("mistralai/mistral-7b-chat") is None:
            continue
        rid = f"routerbench:{r['sample_id']}"
        if rid in out:
            raise ValueError(f"{path}: two scored rows for {rid}")
        out[rid] = _keyed("routerbench", r)
    return out


def _arena_outcomes(shared: Path) -> dict[str, Outcomes]:
    """`arena_bench_v1:<question_id>` -> judge score / 10 per model (40 blank scores skipped)."""
    scores: dict[str, dict[str, str]] = defaultdict(dict)
    with (shared / "arena_bench_v1" / "judgment_scores.csv").open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            scores[f"arena_bench_v1:{r['question_id']}"][r["model"]] = r["score"]
    return {rid: _keyed("arena_bench_v1", s, scale=10.0, every=True) for rid, s in scores.items()}


# RouterDC file -> (bench, multiple choice?), as shared/data/_scripts/build_complexity.py reads them.
_RDC_FILES = {
    "gsm8k-train": ("gsm8k", False),
    "MATH_prealgebra": ("math_prealgebra", False),
    "humaneval_test": ("humaneval", False),
    "humaneval_train": ("humaneval", False),
    "mbpp": ("mbpp", False),
    "javascript": ("humaneval_js", False),
    "arc_challenge_test": ("arc_challenge", True),
    "arc_challenge_train": ("arc_challenge", True),
    "arc_easy_test": ("arc_easy", True),
    "arc_easy_train": ("arc_easy", True),
}


def _rdc_prompt(bench: str, question: str) -> str:
    """The prompt text the shared build made from a RouterDC question (same rewrites)."""
    if bench.startswith("arc"):
        text = re.sub(r"^Question:\s*", "", question)
        return re.sub(r"\s*Answer:\s*$", "", text).strip()
    if bench == "mbpp":
        inner = question.strip().strip('"').strip().split("\n")
        test = "\nYour code should pass this test:\n" + inner[1].strip() if len(inner) > 1 else ""
        return inner[0].strip() + test
    return question


def _rdc_target(scores: Mapping[str, float], mc: bool) -> float:
    solved = [(v > 0) if mc else (v >= 0.5) for v in scores.values()]
    return round(1 - sum(solved) / len(solved), 4)


class _RouterDCIndex:
    """RouterDC scores by (bench, prompt). Ids can't be used directly: `source_id` holds the
    question's index in the file as it was before held-out rows were removed (or a GSM8K /
    MATH / HumanEval id), so rows are matched on the rebuilt prompt text instead."""

    def __init__(self, shared: Path) -> None:
        self._by_prompt: dict[tuple[str, str], list[tuple[str, bool, dict[str, float]]]] = defaultdict(list)
        for name, (bench, mc) in _RDC_FILES.items():
            with gzip.open(shared / "routerdc_small7" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
                for k, item in enumerate(json.load(f)):
                    key = (bench, _rdc_prompt(bench, item["question"]))
                    self._by_prompt[key].append((f"{name}/{k}", mc, item["scores"]))

    def outcomes(self, row: Row) -> Outcomes | None:
        """The row's 7 scores; None when no question matches or duplicates can't be told apart."""
        found = self._by_prompt.get((str(row.get("bench")), str(row["prompt"])), [])
        # A prompt listed twice (10 cases) with different scores: take the copy named by the
        # id, else the one whose solve rate gives the row's target.
        distinct = {json.dumps(s, sort_keys=True): (ref, mc, s) for ref, mc, s in found}
        if len(distinct) > 1:
            named = [c for c in distinct.values() if str(row["source_id"]).endswith("/" + c[0])]
            fits = [c for c in distinct.values() if _rdc_target(c[2], c[1]) == row.get("target")]
            distinct = {"": (named or fits)[0]} if len(named or fits) == 1 else {}
        if len(distinct) != 1:
            return None
        (_, _, scores) = next(iter(distinct.values()))
        return _keyed("routerdc_small7", scores, every=True)


class _OutcomeTable:
    """Per-model outcomes for the rows of the three multi-model sources."""

    def __init__(self, shared: Path) -> None:
        self._by_id = {**_routerbench_outcomes(shared), **_arena_outcomes(shared)}
        self._rdc = _RouterDCIndex(shared)

    def __call__(self, row: Row) -> Outcomes | None:
        if row.get("source") == "routerdc_small7":
            return self._rdc.outcomes(row)
        return self._by_id.get(str(row.get("id")))


def _slim(row: Row, outcomes: Outcomes | None = None) -> Row:
    slim = {k: row[k] for k in _KEEP if row.get(k) is not None}
    if outcomes:
        slim["outcomes"] = outcomes
    return slim


def _check_default_pair(row: Row, outcomes: Outcomes | None) -> None:
    """The outcomes agree with the strong/weak fields the labels were built from."""
    o = outcomes or {}
    if row.get("teacher_correct") is not None:
        pairs = [("gpt-4-1106-preview", row["teacher_correct"]), ("mistral-7b", row.get("small_correct"))]
    elif row.get("teacher_score") is not None and "gpt-4-1106-preview" in o:
        pairs = [("gpt-4-1106-preview", row["teacher_score"] / 10)]
    else:
        return
    for key, want in pairs:
        if want is None or o.get(key) is None or abs(o[key] - float(want)) > 1e-9:
            raise ValueError(f"{row['id']}: outcomes[{key!r}] = {o.get(key)} but the label used {want}")


def _routing_row(row: Row, outcomes: Outcomes | None = None) -> Row | None:
    """Strong/weak quality for dev rows that measured both models on the same prompt."""
    if row.get("teacher_correct") is not None and row.get("small_correct") is not None:
        strong, weak = float(row["teacher_correct"]), float(row["small_correct"])
    elif row.get("teacher_score") is not None and row.get("small_mean_score") is not None:
        # arena_bench_v1: GPT-4 judge scores on a 1-10 scale.
        strong, weak = row["teacher_score"] / 10, row["small_mean_score"] / 10
    else:
        return None
    return {**_slim(row, outcomes), "strong_score": round(strong, 4), "weak_score": round(weak, 4)}


STEPS_SOURCE = "gsm8k_steps"
# Solution lines at or above this count share one target (few problems need more).
_MAX_STEPS = 7


def _norm_prompt(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _solution_steps(answer: str) -> int:
    """Lines of a GSM8K reference solution, not counting the final `#### answer` line."""
    return len([ln for ln in answer.split("\n") if ln.strip() and not ln.startswith("####")])


def gsm8k_step_rows(shared: Path, rows: Sequence[Row], dev_prompts: Iterable[str]) -> list[Row]:
    """Soft-labelled rows for the GSM8K *train* questions that no other row holds.

    The 7 small models' failure rate on a GSM8K-train question (`routerdc_small7`) rises
    with the length of its reference solution (Spearman 0.48 on the ~970 questions that
    have both). The other ~6,500 GSM8K-train questions have a solution but no model
    outcomes; each gets as `target` the mean failure rate of the train-split questions with
    the same number of solution lines. Questions in the dev split are left out, and GSM8K's
    test split is never read.
    """
    problems = list(read_jsonl(shared / "gsm8k" / "train.jsonl"))
    steps = {_norm_prompt(str(p["question"])): _solution_steps(str(p["answer"])) for p in problems}
    by_steps: dict[int, list[float]] = {}
    for r in rows:
        if r.get("bench") == "gsm8k" and r.get("target") is not None:
            n = steps.get(_norm_prompt(str(r["prompt"])))
            if n is not None:
                by_steps.setdefault(min(max(n, 2), _MAX_STEPS), []).append(float(r["target"]))
    target = {n: round(sum(v) / len(v), 4) for n, v in by_steps.items()}
    taken = {_norm_prompt(str(r["prompt"])) for r in rows} | {_norm_prompt(p) for p in dev_prompts}
    out: list[Row] = []
    for i, p in enumerate(problems):
        question = str(p["question"])
        if _norm_prompt(question) in taken:
            continue
        n = min(max(_solution_steps(str(p["answer"])), 2), _MAX_STEPS)
        out.append(
            {
                "id": f"{STEPS_SOURCE}:train/{i}",
                "source": STEPS_SOURCE,
                "family": "math",
                "bench": "gsm8k",
                "prompt": question,
                "target": target[n],
            }
        )
    return out


def build_repo_data(shared: Path, out: Path = DATA_DIR) -> dict[str, int]:
    """Copy the shippable train/dev rows and the routing dev set from `shared` into `out`."""
    labelled = {
        split: [r for r in read_jsonl(shared / f"complexity_{split}.jsonl") if is_shippable(r)]
        for split in ("train", "dev")
    }
    ambiguous = [r for r in read_jsonl(shared / "complexity_unlabelled_ambiguous.jsonl") if is_shippable(r)]
    table = _OutcomeTable(shared)
    outcomes: dict[str, Outcomes | None] = {}
    for r in labelled["train"] + labelled["dev"] + ambiguous:
        outcomes[r["id"]] = table(r)
        _check_default_pair(r, outcomes[r["id"]])
    # Ambiguous rows keep `target` (soft label) and no `label`; training reads both.
    train = [_slim(r, outcomes[r["id"]]) for r in labelled["train"]]
    train += [
        _slim(r, outcomes[r["id"]])
        for r in ambiguous
        if r["split"] == "train" and r.get("target") is not None
    ]
    dev = [_slim(r, outcomes[r["id"]]) for r in labelled["dev"]]
    dev_split = [str(r["prompt"]) for r in labelled["dev"] + ambiguous if r["split"] == "dev"]
    train += gsm8k_step_rows(shared, train, dev_split)
    routing = [
        rr
        for r in labelled["dev"] + [r for r in ambiguous if r["split"] == "dev"]
        if (rr := _routing_row(r, outcomes[r["id"]])) is not None
    ]
    routing.sort(key=lambda r: str(r["id"]))
    out.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_jsonl_gz(out / TRAIN_PATH.name, train),
        "dev": write_jsonl_gz(out / DEV_PATH.name, dev),
        "routing_dev": write_jsonl_gz(out / ROUTING_DEV_PATH.name, routing),
    }


if __name__ == "__main__":
    counts = build_repo_data(Path(sys.argv[1]))
    sys.stdout.write(json.dumps(counts) + "\n")
