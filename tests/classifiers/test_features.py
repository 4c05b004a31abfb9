"""Batched features: `featurize_many` equals `featurize` on every text, bit for bit."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from classifiers.dataset import DEV_PATH, TRAIN_PATH, read_jsonl
from classifiers.features import HEAD_CHARS, TAIL_CHARS, Features, featurize, featurize_many


def _assert_same(got: Features, want: Features) -> None:
    for name in ("char_idx", "word_idx", "cues"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        # Bit for bit: the lexical score sums these, and score_many must equal score_text.
        assert g.tobytes() == w.tobytes(), name


def _check(texts: Sequence[str]) -> None:
    got = featurize_many(texts)
    assert len(got) == len(texts)
    for text, g in zip(texts, got, strict=True):
        _assert_same(g, featurize(text))


@pytest.mark.parametrize("path", [TRAIN_PATH, DEV_PATH], ids=["train", "dev"])
def test_matches_featurize_on_the_data(path: Path) -> None:
    texts = [r["prompt"] for r in read_jsonl(path)]
    assert texts
    for i in range(0, len(texts), 512):
        _check(texts[i : i + 512])


TRICKY = [
    "",
    "a",
    "0",
    "\n",
    "\n\n- a\n1. b\na) c",
    "0123456789" * 7,
    "İ" * 5000,  # lower-casing lengthens it: clipped again after
    "Long " * 10_000,  # 50,000 chars: clipped to a head and a tail
    "\ud800x",
    "\ud83d\ude00 \udfff lone and paired surrogates",
    "中文的提示：请解释量子计算。日本語もあります",
    "emoji 😀🚀 and 👩‍💻 in text",
    "ends in a number 12345",
    "   leading and trailing spaces   ",
    " ",
    "question?\nb) yes\na)",
    "last line\na)",
    "a.",
    "x\x00y\x00\x00 nul characters 7",
    "What is 2 + 2?",
    "what\nwhat",
    "Explain why\r\n* one\r\n* two",
    "à" * 4_200 + "\n\n",
    "é" * (HEAD_CHARS + TAIL_CHARS) + "1",
    "É" * (HEAD_CHARS + TAIL_CHARS + 1),
    "same text twice",
    "same text twice",
]


def test_tricky_texts_in_one_batch() -> None:
    _check(TRICKY)
    _check(list(reversed(TRICKY)))


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_alone(text: str) -> None:
    _check([text])


def test_batch_longer_than_the_kept_power_tables() -> None:
    texts = [f"word {i} " * 700 for i in range(300)]  # clipped: about 1.2M positions in all
    assert sum(len(t) for t in texts) > 1 << 20
    _check(texts)
    _check(texts[:3])


def test_empty_batch() -> None:
    assert featurize_many([]) == []


def test_random_texts_in_random_batches() -> None:
    rng = random.Random(20260101)
    alphabet = [
        "\n",
        "0",
        "7",
        "42",
        "a)",
        "b.",
        "-",
        "*",
        " ",
        "  ",
        "İ",
        "é",
        "x",
        "Why",
        "what",
        "?",
        "_",
        "\t",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(300)]
    i = 0
    while i < len(texts):
        size = rng.choice([1, 2, 3, 7, 16, 50])
        _check(texts[i : i + size])
        i += size
    _check(texts)


def test_returns_independent_index_arrays() -> None:
    a, b = featurize_many(["first prompt here", "second one"])
    assert not np.shares_memory(a.char_idx, b.char_idx)
    assert not np.shares_memory(a.word_idx, b.word_idx)
