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

Shared (`state:` with `share_controller`), the window and the factor live in Redis: each
update sends this replica's scores since the last one, and the new factor is computed there
from every replica's recent scores, so all replicas use one factor. While Redis does not
answer, the controller updates from its own window, as unshared.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from router.config import RoutingConfig

__all__ = ["GAIN", "ShareController", "SharedWindow"]

# Fraction of the gap to the ideal factor closed per update.
GAIN = 0.5

# (factor, share of the shared window that went to students), or None when it failed.
Adopt = Callable[[tuple[float, float] | None], None]


class SharedWindow(Protocol):
    """The controller's window kept for every replica (`router.share_window`)."""

    def push(self, batch: list[tuple[float, bool]], done: Adopt) -> None:
        """Add (score, went to a student) pairs and compute the next factor; `done` gets it."""
        ...


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
        self._shared: SharedWindow | None = None
        self._on_change: Callable[[], None] | None = None
        self._batch: list[tuple[float, bool]] = []
        self._shared_share = math.nan

    @property
    def top(self) -> float:
        """The top student's configured threshold (what the factor scales)."""
        return self._top

    def share(self, window: SharedWindow, on_change: Callable[[], None] | None) -> None:
        """Update from `window` (every replica's scores); `on_change` when a new factor arrives."""
        self._shared = window
        self._on_change = on_change

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
        if self._shared is not None and not math.isnan(self._shared_share):
            return self._shared_share
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
        if self._shared is not None:
            self._batch.append((score, to_student))
        self._since_update += 1
        if self._since_update < self._every:
            return False
        self._since_update = 0
        if self._shared is not None and self.enabled:
            batch, self._batch = self._batch, []
            self._shared.push(batch, self._adopt)
            return False  # reported when the shared factor arrives
        if self.enabled:
            self._update()
        return True

    def _adopt(self, shared: tuple[float, float] | None) -> None:
        if shared is None:
            self._update()  # Redis did not answer: this replica's own window decides
        else:
            self.factor, self._shared_share = shared
        if self._on_change is not None:
            self._on_change()

    def _update(self) -> None:
        assert self.target is not None
        ordered = sorted(self._scores)
        # The score below which `target` of recent requests fall.
        k = min(int(self.target * len(ordered)), len(ordered) - 1)
        ideal = self._clamp(ordered[k] / self._top if self._top > 0 else 1.0)
        self.factor += GAIN * (ideal - self.factor)

    def _clamp(self, factor: float) -> float:
        # Bound the top student's threshold, which bounds all the others.
        top = min(max(self._top * factor, self._low), self._high)
        return top / self._top
