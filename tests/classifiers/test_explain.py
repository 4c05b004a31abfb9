"""Explanations of the shipped model's scores: they add up, name the right buckets, and print."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from classifiers import features as F
from classifiers.explain import (
    GROUPS,
    char_bucket,
    char_ngrams,
    explain,
    format_explanation,
    word_bucket,
    word_ngrams,
)
from classifiers.learned import LearnedScorer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "classifiers" / "models" / "complexity.joblib"
PROOF = (
    "Prove that the integral of sin(x)^2 over [0, pi] equals pi/2. Prove the bound on the "
    "integral rigorously, then prove the theorem for every integer n > 1."
)
TEXTS = [
    PROOF,
    "thanks",
    "",
    # Mixed scripts ("İ" lower-cases to two code points), a NUL (hashes like the end
    # padding), a no-break space (a word character to featurize).
    "İstanbul Ünïcode 42 apples\x00x\u00a0y é",
    # Long: featurize keeps a head and a tail.
    ("Ünïcode 42 apples,\n- item 7\tdone\n" * 150) + "What is 12 * 34?",
]
IDS = ["proof", "thanks", "empty", "scripts", "long"]


@pytest.fixture(scope="module")
def scorer() -> LearnedScorer:
    """The shipped model."""
    return LearnedScorer.load(MODEL)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_parts_add_up_to_decision(scorer: LearnedScorer, text: str, centered: bool) -> None:
    cue_mean = scorer.cue_mean if centered else None
    e = explain(scorer, text, cue_mean=cue_mean)
    z = scorer.decision(text)
    assert abs(e.log_odds - z) < 1e-9
    assert abs(e.lexical - scorer.lexical(text)) < 1e-9
    assert abs(e.semantic - scorer.semantic_part(text)) < 1e-9
    lexical = e.lexical_offset + e.total("char n-grams") + e.total("word n-grams") + e.total("cues")
    assert abs(lexical - e.lexical) < 1e-9
    assert abs(e.semantic_offset + e.total("tokens") - e.semantic) < 1e-9
    assert e.probability == pytest.approx(scorer.score_text(text), abs=1e-12)
    for group in GROUPS:
        values = [abs(c.value) for c in e.groups[group]]
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_named_ngrams_hash_to_featurize_buckets(scorer: LearnedScorer, text: str) -> None:
    f = F.featurize(text)
    chars = char_ngrams(text)
    assert [char_bucket(g) for g in chars] == f.char_idx.tolist()
    assert [word_bucket(g) for g in word_ngrams(text)] == f.word_idx.tolist()
    # The explanation aggregates occurrences by name: counts expand back to the same multiset.
    e = explain(scorer, text)
    named = Counter({c.name: c.count for c in e.groups["char n-grams"]})
    assert Counter(chars) == named
    buckets: Counter[int] = Counter()
    for c in e.groups["char n-grams"]:
        buckets[char_bucket(c.name)] += c.count
    assert buckets == Counter(f.char_idx.tolist())
    words: Counter[int] = Counter()
    for c in e.groups["word n-grams"]:
        words[word_bucket(c.name)] += c.count
    assert words == Counter(f.word_idx.tolist())


def test_proof_is_pushed_up_by_math(scorer: LearnedScorer) -> None:
    e = explain(scorer, PROOF, cue_mean=scorer.cue_mean)
    assert e.probability > 0.5
    names = [name.lower() for group in GROUPS for name, _ in e.top_positive(group)]
    assert any(m in n for n in names for m in ("prov", "integr", "theorem", "math", "^"))
    assert all(v > 0 for g in GROUPS for _, v in e.top_positive(g))
    assert all(v < 0 for g in GROUPS for _, v in e.top_negative(g))
    assert all(len(e.top_positive(g)) <= e.top for g in GROUPS)


def test_empty_text(scorer: LearnedScorer) -> None:
    e = explain(scorer, "", top=3)
    assert e.groups["char n-grams"] == () and e.groups["word n-grams"] == () and e.groups["tokens"] == ()
    assert np.isfinite(e.log_odds)
    assert "log-odds" in format_explanation(e)


def _route(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", "route", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_cli_route_explain() -> None:
    out = _route("--explain", PROOF, "--config", "config.yaml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("score ") and "-> teacher (classifier)" in lines[0]
    assert lines[1].startswith("policy: student-small below ")
    assert any(line.startswith("log-odds ") for line in lines)
    for group in GROUPS:
        assert any(line.startswith(f"{group} (") for line in lines)
    assert "first word 'prove'" in out.stdout
    # Without the flag the output stays one line.
    plain = _route(PROOF, "--config", "config.yaml")
    assert plain.returncode == 0 and plain.stdout == lines[0] + "\n"


def test_cli_route_explain_heuristic(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["classifier"] = {"kind": "heuristic"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = _route("--explain", "thanks", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("score ")
    assert "the heuristic scorer has no feature breakdown" in out.stdout
