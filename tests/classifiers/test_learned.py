"""The learned scorer: reload, ordering, exact agreement with scikit-learn, robustness."""

from __future__ import annotations

import time
from pathlib import Path

import joblib
import numpy as np
import pytest

from classifiers import features as F
from classifiers.artifact import save, sigmoid
from classifiers.dataset import DEV_PATH, read_jsonl
from classifiers.learned import ArtifactError, LearnedScorer
from classifiers.registry import load_scorer
from classifiers.train import Fitted, featurize_all


def test_reload_and_ordering(model_path: Path) -> None:
    scorer = load_scorer("learned", model_path)
    assert isinstance(scorer, LearnedScorer)
    proof = scorer.score_text(
        "Prove that the square root of 2 is irrational. Give a rigorous proof, step by step."
    )
    thanks = scorer.score_text("thanks")
    assert proof > thanks
    assert scorer.score([{"role": "user", "content": "thanks"}]) == pytest.approx(thanks)


def test_hot_path_matches_predict_proba(fitted: Fitted) -> None:
    scorer = LearnedScorer(fitted.artifact)
    texts = [r["prompt"] for r in list(read_jsonl(DEV_PATH))[:200]] + ["", "x", "é" * 5000]
    feats = featurize_all(texts)
    a = fitted.artifact
    x = F.feature_matrix(feats, np.asarray(a["idf"], np.float64), a["cue_mean"], a["cue_std"])
    expected = fitted.estimator.predict_proba(x)[:, 1]
    got = np.array([sigmoid(scorer.lexical(t)) for t in texts])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # The semantic half: per-token weights over cached chunks equal the fitted regression
    # on the prompt's mean MiniLM vector.
    semantic = fitted.mix * fitted.semantic.decision_function(fitted.semantic_inputs(texts))
    got_semantic = np.array([scorer.semantic_part(t) for t in texts])
    np.testing.assert_allclose(got_semantic, semantic, rtol=0, atol=1e-9)
    assert np.std(semantic) > 0.1  # it moves scores, not a constant
    np.testing.assert_allclose(
        [scorer.decision(t) for t in texts], [scorer.lexical(t) + scorer.semantic_part(t) for t in texts]
    )
    calib_a, calib_b = a["calibration"]
    assert calib_a > 0  # higher log-odds must still mean "needs the teacher" after calibration
    assert scorer.score_text(texts[0]) == pytest.approx(
        sigmoid(calib_a * scorer.decision(texts[0]) + calib_b), abs=1e-12
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\x00\x01\x02\x1b[31m\r\n\t\x7f",
        "\ud800 lone surrogate \udfff",
        "😀👩‍👩‍👧 漢字 العربية ﷽ \u202e reversed \u200b",
        "a" * 1_000_000,
        "Prove x^2 >= 0. " * 70_000,
        "İ" * 5_000,  # lower-casing makes it longer than the clip
    ],
)
def test_any_input_gives_probability_quickly(model_path: Path, text: str) -> None:
    scorer = LearnedScorer.load(model_path)
    start = time.perf_counter()
    p = scorer.score_text(text)
    assert time.perf_counter() - start < 0.05
    assert 0.0 <= p <= 1.0


def test_version_mismatch_is_a_clear_error(fitted: Fitted, tmp_path: Path) -> None:
    path = tmp_path / "old.joblib"
    save({**fitted.artifact, "format_version": 0}, path)
    with pytest.raises(ArtifactError, match="format version 0"):
        LearnedScorer.load(path)
    joblib.dump({"something": "else"}, path)
    with pytest.raises(ArtifactError, match="not a triage-complexity artifact"):
        LearnedScorer.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"x", bytes(range(256)) * 12, b"\x80\x04\x95garbage"],
    ids=["empty", "one-byte", "random", "broken-pickle"],
)
def test_a_file_that_is_no_artifact_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.joblib"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match="not a readable classifier artifact"):
        LearnedScorer.load(path)


def test_an_artifact_missing_its_parts_is_a_clear_error(fitted: Fitted, tmp_path: Path) -> None:
    path = tmp_path / "partial.joblib"
    artifact = dict(fitted.artifact)
    del artifact["token_weights"]
    save(artifact, path)
    with pytest.raises(ArtifactError, match="missing or malformed parts"):
        LearnedScorer.load(path)


def test_foreign_sklearn_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit([[0.0], [1.0]], [0, 1])
    path = tmp_path / "foreign.joblib"
    with monkeypatch.context() as m:
        # Pickle as another scikit-learn release would.
        m.setattr("sklearn.base.__version__", "0.0.1")
        joblib.dump({"format": "triage-complexity", "estimator": model}, path)
    with pytest.raises(ArtifactError, match="another scikit-learn"):
        LearnedScorer.load(path)


def test_shipped_artifact_loads() -> None:
    from classifiers.cli import DEFAULT_MODEL

    scorer = LearnedScorer.load(DEFAULT_MODEL)
    assert scorer.metadata["rows_by_source"].keys().isdisjoint({"alpaca_eval", "alpaca_seed"})
    assert scorer.score_text("Write a proof of Fermat's little theorem.") > scorer.score_text("hi")


def test_score_many_batches_tokenizing_and_matches_score_text(
    fitted: Fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from classifiers import learned, semantic
    from classifiers.semantic import CACHE_KEY_CHARS, split_chunks

    dev = [r["prompt"] for r in list(read_jsonl(DEV_PATH))[:200]]
    odd = [
        "",
        "x",
        "again again again",
        "a\x0cb \x85 c\x1fd",
        "\ud800 lone surrogate \udfff",
        "https://example.com/" + "very-long-path-segment-" * 10,
        "Prove x^2 >= 0. " * 2_000,
    ]
    texts = dev + odd + dev[:20]
    expected = [LearnedScorer(fitted.artifact).score_text(t) for t in texts]

    monkeypatch.setattr(learned, "_PRIME_BATCH", 64)
    scorer = LearnedScorer(fitted.artifact)
    calls: list[int] = []
    encode = scorer.semantic._encode

    def counting(chunks: list[str]) -> dict[str, complex]:
        calls.append(len(chunks))
        return encode(chunks)

    monkeypatch.setattr(scorer.semantic, "_encode", counting)
    assert scorer.score_many(iter(texts)) == expected  # exactly, in order, from a generator
    slices = -(-len(texts) // 64)
    with_long = sum(any(len(c) > CACHE_KEY_CHARS for c in split_chunks(t)) for t in texts)
    # One tokenizer call per slice, plus one per text holding an uncacheable long chunk.
    assert len(calls) <= slices + with_long < len(texts) // 4
    assert scorer.score_many(texts) == expected  # warm cache: no re-encoding of short chunks
    assert len(calls) <= slices + 2 * with_long

    # Near the cache bound priming stands aside; the scores stay the same.
    monkeypatch.setattr(semantic, "CACHE_ENTRIES", 10)
    assert LearnedScorer(fitted.artifact).score_many(texts) == expected
