"""Comparison baseline: a plain TF-IDF + LogisticRegression pipeline (scikit-learn end to end).

This is the model the shipped scorer must beat; it matches shared/data's sanity baseline
(word 1-2-grams and char_wb 3-5-grams, sublinear TF, C=2, balanced classes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline, make_union

from classifiers.base import TextScorer


class TfidfScorer(TextScorer):
    """Scores with a fitted TF-IDF + LogisticRegression pipeline (slow path: ~1 ms a call)."""

    name = "tfidf"

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int]) -> TfidfScorer:
        """Fit the baseline pipeline on hard labels."""
        union = make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True),
            TfidfVectorizer(
                analyzer="char_wb",
                ngram_range=(3, 5),
                min_df=3,
                max_features=200_000,
                sublinear_tf=True,
            ),
        )
        model = LogisticRegression(C=2.0, max_iter=3000, class_weight="balanced")
        return cls(make_pipeline(union, model).fit(list(texts), list(labels)))

    def score_text(self, text: str) -> float:
        """Probability of label 1 for one text."""
        return self.score_many([text])[0]

    def score_many(self, texts: Iterable[str]) -> list[float]:
        """Probabilities of label 1, one batched `predict_proba` call."""
        return [float(p) for p in self.pipeline.predict_proba(list(texts))[:, 1]]
