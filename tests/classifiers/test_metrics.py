"""AUROC and RouteLLM routing metrics against hand-checked cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from classifiers.metrics import auroc, routing_curve


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_routing_curve_perfect_random_and_constant() -> None:
    strong = np.array([1, 1, 1, 1, 0.0])
    weak = np.array([0, 0, 1, 1, 0.0])
    perfect = routing_curve([0.9, 0.8, 0.1, 0.2, 0.3], strong, weak)
    assert perfect.cpt(1.0) == pytest.approx(0.4)
    assert perfect.cpt(0.5) == pytest.approx(0.2)
    assert perfect.apgr() == pytest.approx(0.8)  # 0.5*0.4*1 + 0.6*1
    worst = routing_curve([0.0, 0.1, 0.9, 0.8, 0.7], strong, weak)
    assert worst.apgr() < 0.5 < perfect.apgr()
    # One tie block: routed together, so the curve is the random router's diagonal.
    constant = routing_curve(np.zeros(5), strong, weak)
    assert constant.apgr() == pytest.approx(0.5)
    assert constant.cpt(0.8) == pytest.approx(0.8)


def test_pgr_at_interpolates_between_curve_points() -> None:
    strong = np.array([1, 1, 1, 1, 0.0])
    weak = np.array([0, 0, 1, 1, 0.0])
    perfect = routing_curve([0.9, 0.8, 0.1, 0.2, 0.3], strong, weak)
    # Curve points (0, 0), (0.2, 0.5), (0.4, 1), then flat at 1.
    assert perfect.pgr_at(0.0) == 0.0
    assert perfect.pgr_at(0.1) == pytest.approx(0.25)
    assert perfect.pgr_at(0.3) == pytest.approx(0.75)
    assert perfect.pgr_at(0.7) == pytest.approx(1.0)
    assert perfect.pgr_at(1.0) == pytest.approx(1.0)
    # A constant scorer is the random router: PGR equals the strong share everywhere.
    constant = routing_curve(np.ones(5), strong, weak)
    assert constant.pgr_at(0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="outside"):
        perfect.pgr_at(1.5)


def test_routing_curve_needs_a_gap() -> None:
    with pytest.raises(ValueError, match="strong model beats"):
        routing_curve([0.1, 0.2], [1, 0], [1, 0])
