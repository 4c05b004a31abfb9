"""Latency and memory of the shipped complexity scorer (prints numbers; no asserts).

    .venv/bin/python bench/classifier.py

Targets: p50 < 100 us and p99 < 500 us per single ~300-token prompt, RSS < 100 MB.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifiers.cli import DEFAULT_MODEL  # noqa: E402
from classifiers.dataset import DEV_PATH, read_jsonl  # noqa: E402
from classifiers.learned import LearnedScorer  # noqa: E402

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


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc), falling back to the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Measure single-request latency percentiles, bulk throughput and RSS."""
    before = rss_mb()
    scorer = LearnedScorer.load(DEFAULT_MODEL)
    after = rss_mb()
    for _ in range(500):
        scorer.score_text(PROMPT)
    gc.collect()
    times = []
    for _ in range(20_000):
        start = time.perf_counter_ns()
        scorer.score_text(PROMPT)
        times.append(time.perf_counter_ns() - start)
    times.sort()
    n = len(times)
    print(
        f"prompt: {len(PROMPT)} chars, {len(PROMPT.split())} words, "
        f"~{len(PROMPT) // 4} tokens at 4 chars/token"
    )
    print(
        f"single: p50 {times[n // 2] / 1e3:.1f} us  p99 {times[int(n * 0.99)] / 1e3:.1f} us  "
        f"mean {statistics.fmean(times) / 1e3:.1f} us"
    )
    texts = [r["prompt"] for r in read_jsonl(DEV_PATH)] * 4
    bulk_start = time.perf_counter()
    scorer.score_many(texts)
    elapsed = time.perf_counter() - bulk_start
    print(f"bulk: {len(texts) / elapsed:,.0f} prompts/s on {len(texts)} dev prompts")
    print(
        f"RSS: {after:.1f} MB with the model loaded ({after - before:.1f} MB for the model; "
        f"{before:.1f} MB before loading)"
    )


if __name__ == "__main__":
    main()
