"""Labelled prompt rows: the in-repo copies, how they were cut from shared/data, and readers.

The shipped model trains only on rows copied into `classifiers/data/` (see PROVENANCE.md there),
so `triage train` reproduces it without the shared folder. `build_repo_data` made those copies:

    python -m classifiers.dataset /work/shared/data

Rules it applies (the licence and held-out rules in shared/data/README.md):
- no CC BY-NC rows (`alpaca_eval`, `alpaca_seed`) anywhere in the repo;
- no GSM8K-test or MMLU-test items. The shared files still hold RouterDC rows with
  `source_id` `gsm8k/test/...` and `mmlu/...`; RouterDC's "mmlu_train" is itself cut from
  the MMLU test split (e.g. "What is a replay attack?"), so every RouterDC MMLU row is dropped.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterable, Iterator
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


def _slim(row: Row) -> Row:
    return {k: row[k] for k in _KEEP if row.get(k) is not None}


def _routing_row(row: Row) -> Row | None:
    """Strong/weak quality for dev rows that measured both models on the same prompt."""
    if row.get("teacher_correct") is not None and row.get("small_correct") is not None:
        strong, weak = float(row["teacher_correct"]), float(row["small_correct"])
    elif row.get("teacher_score") is not None and row.get("small_mean_score") is not None:
        # arena_bench_v1: GPT-4 judge scores on a 1-10 scale.
        strong, weak = row["teacher_score"] / 10, row["small_mean_score"] / 10
    else:
        return None
    return {**_slim(row), "strong_score": round(strong, 4), "weak_score": round(weak, 4)}


def build_repo_data(shared: Path, out: Path = DATA_DIR) -> dict[str, int]:
    """Copy the shippable train/dev rows and the routing dev set from `shared` into `out`."""
    labelled = {
        split: [r for r in read_jsonl(shared / f"complexity_{split}.jsonl") if is_shippable(r)]
        for split in ("train", "dev")
    }
    ambiguous = [r for r in read_jsonl(shared / "complexity_unlabelled_ambiguous.jsonl") if is_shippable(r)]
    # Ambiguous rows keep `target` (soft label) and no `label`; training reads both.
    train = [_slim(r) for r in labelled["train"]]
    train += [_slim(r) for r in ambiguous if r["split"] == "train" and r.get("target") is not None]
    dev = [_slim(r) for r in labelled["dev"]]
    routing = [
        rr
        for r in labelled["dev"] + [r for r in ambiguous if r["split"] == "dev"]
        if (rr := _routing_row(r)) is not None
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
