"""How often the task-family tagger (`classifiers/family.py`) agrees with labelled families.

Reads `complexity_train.jsonl` from the shared data folder (its `family` labels: chat,
code, math, knowledge_mc, commonsense_mc; both multiple-choice labels count as
`knowledge`) and prints accuracy overall, per labelled family, and the confusion table.
Only the training file is read: the held-out benchmarks stay out of it.

    .venv/bin/python bench/family_tagger.py [--data ../shared/data/complexity_train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classifiers.family import FAMILIES, family_of  # noqa: E402

_LABELS = {"knowledge_mc": "knowledge", "commonsense_mc": "knowledge"}


def main() -> int:
    """Print the tagger's accuracy on the labelled rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/complexity_train.jsonl"))
    args = parser.parse_args()
    pairs: Counter[tuple[str, str]] = Counter()
    with args.data.open() as f:
        for line in f:
            row = json.loads(line)
            truth = _LABELS.get(row["family"], row["family"])
            pairs[truth, family_of(row["prompt"])] += 1
    total = sum(pairs.values())
    right = sum(n for (truth, got), n in pairs.items() if truth == got)
    print(f"{total} prompts, accuracy {right / total:.3f}")
    print(f"{'label':<11}" + "".join(f"{f:>11}" for f in FAMILIES) + f"{'accuracy':>11}")
    for truth in FAMILIES:
        row_n = sum(pairs[truth, f] for f in FAMILIES)
        cells = "".join(f"{pairs[truth, f]:>11}" for f in FAMILIES)
        acc = pairs[truth, truth] / row_n if row_n else float("nan")
        print(f"{truth:<11}{cells}{acc:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
