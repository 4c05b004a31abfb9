"""The student-share controller: scales student thresholds so a target share of traffic goes to students.

It keeps the last `share_window` classifier scores. Every `share_update_every`
requests it finds the factor that would have sent the target share of that
window to students (the target quantile of the scores over the top student's
configured `max_score`), and moves the current factor part of the way there.
Aiming at a quantile of observed scores, rather than reacting to the observed
share, means one step does not overshoot, so the loop cannot oscillate; the
partial step smooths noise. All thresholds scale by one factor, so the
ladder of students keeps its order. Thresholds stay within
`min_score_threshold`/`max_score_threshold`, and the controller starts from
the configured thresholds (factor 1) after a restart.
"""

from __future__ import annotations

from collections import deque

from router.config import RoutingConfig

__all__ = ["ShareController"]

# Fraction of the gap to the ideal factor closed per update.
_GAIN = 0.5


class ShareController:
    """Tracks recent scores and the share routed to students; owns the threshold factor."""

    def __init__(self, routing: RoutingConfig, base_thresholds: dict[str, float]) -> None:
        self.target = routing.target_student_share
        self.base = dict(base_thresholds)
        self._top = max(base_thresholds.values()) if base_thresholds else 1.0
        self._low = routing.min_score_threshold
        self._high = routing.max_score_threshold
        self._every = routing.share_update_every
        self._scores: deque[float] = deque(maxlen=routing.share_window)
        self._to_student: deque[bool] = deque(maxlen=routing.share_window)
        self._students = 0
        self._since_update = 0
        self.factor = 1.0
        self.factor = self._clamp(1.0) if self.target is not None else 1.0

    @property
    def enabled(self) -> bool:
        """Whether a target share is configured."""
        return self.target is not None and bool(self.base)

    def threshold(self, model: str) -> float:
        """The effective max_score of a student now."""
        return self.base[model] * self.factor

    def thresholds(self) -> dict[str, float]:
        """Every student's effective max_score."""
        return {name: base * self.factor for name, base in self.base.items()}

    @property
    def observed_share(self) -> float:
        """Share of the recent window that went to students (NaN before any traffic)."""
        n = len(self._to_student)
        return self._students / n if n else float("nan")

    def observe(self, score: float, to_student: bool) -> bool:
        """Record one classifier-routed request; True every `share_update_every` requests
        (time to export the thresholds and the observed share)."""
        if len(self._to_student) == self._to_student.maxlen:
            self._students -= self._to_student[0]
        self._to_student.append(to_student)
        self._students += to_student
        self._scores.append(score)
        self._since_update += 1
        if self._since_update < self._every:
            return False
        self._since_update = 0
        if self.enabled:
            self._update()
        return True

    def _update(self) -> None:
        assert self.target is not None
        ordered = sorted(self._scores)
        # The score below which `target` of recent requests fall.
        k = min(int(self.target * len(ordered)), len(ordered) - 1)
        ideal = self._clamp(ordered[k] / self._top if self._top > 0 else 1.0)
        self.factor += _GAIN * (ideal - self.factor)

    def _clamp(self, factor: float) -> float:
        # Bound the top student's threshold, which bounds all the others.
        top = min(max(self._top * factor, self._low), self._high)
        return top / self._top
