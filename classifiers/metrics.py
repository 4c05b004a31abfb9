"""Ranking and routing metrics: AUROC, and RouteLLM's PGR curve, APGR and CPT.

Routing metrics (RouteLLM, Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference
Data", section 5.1): send the prompts with the highest scores to the strong model and the
rest to the weak one. With a share `c` of calls sent to the strong model, quality is
`q(c)` = the mean of `strong_score` on routed-strong prompts and `weak_score` elsewhere.

- PGR(c) = (q(c) - q_weak) / (q_strong - q_weak): the share of the strong-over-weak gap
  recovered (q_weak = q(0), q_strong = q(1)).
- APGR = the area under PGR(c) for c from 0 to 1. A random router scores about 0.5.
- CPT(x) = the smallest share of strong calls with PGR(c) >= x.
- PGR at a fixed share, e.g. `pgr_at(0.3)`: the gap recovered when 30% of calls go to the
  strong model (70% stay on the weak one); a random router gets 0.3.

Ties in score are routed together (the curve is linear across a tie), so a constant scorer
gets exactly the random router's straight line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
F64 = npt.NDArray[np.float64]


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Mid-ranks for ties: every member of a tie block gets the block's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class RoutingCurve:
    """PGR at each tie-block boundary, as a function of the share of strong calls."""

    strong_share: F64
    pgr: F64

    def apgr(self) -> float:
        """Area under PGR over strong share in [0, 1] (trapezoid rule)."""
        x, y = self.strong_share, self.pgr
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))

    def pgr_at(self, share: float) -> float:
        """PGR with `share` of calls sent to the strong model (linear between curve points)."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"strong share {share} is outside [0, 1]")
        return float(np.interp(share, self.strong_share, self.pgr))

    def cpt(self, target: float) -> float:
        """Smallest share of strong calls reaching PGR >= target (interpolated)."""
        x, y = self.strong_share, self.pgr
        hit = np.flatnonzero(y >= target - 1e-12)
        if len(hit) == 0:
            return float("nan")
        i = int(hit[0])
        if i == 0:
            return float(x[0])
        frac = (target - y[i - 1]) / (y[i] - y[i - 1])
        return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def routing_curve(scores: ArrayLike, strong: ArrayLike, weak: ArrayLike) -> RoutingCurve:
    """The PGR curve of routing the highest scores to the strong model.

    Raises ValueError when the strong model is not better than the weak one on average,
    because PGR is undefined then.
    """
    s = np.asarray(scores, dtype=np.float64)
    q_strong = np.asarray(strong, dtype=np.float64)
    q_weak = np.asarray(weak, dtype=np.float64)
    gap = float(q_strong.sum() - q_weak.sum())
    if len(s) == 0 or gap <= 0:
        raise ValueError("PGR needs rows where the strong model beats the weak one on average")
    order = np.argsort(-s, kind="mergesort")
    gain = (q_strong - q_weak)[order]
    sorted_s = s[order]
    # Boundaries of tie blocks, in routing order.
    cuts = np.r_[np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1, len(s)]
    gained = np.r_[0.0, np.cumsum(gain)[cuts - 1]]
    share = np.r_[0.0, cuts / len(s)]
    return RoutingCurve(strong_share=share, pgr=gained / gap)
