"""A retry budget: retries and fallbacks earn a fraction of a token per request.

When an upstream is down, every request would otherwise try it, retry it and
fall back, multiplying load on whatever is still up. The budget caps extra
attempts at `ratio` per request on average, with a small burst allowance.
"""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    """A token bucket filled by requests and drained by retries."""

    def __init__(self, ratio: float, burst: int) -> None:
        self.ratio = ratio
        self.burst = float(burst)
        self.tokens = float(burst)

    def on_request(self) -> None:
        """Every request earns `ratio` of a retry."""
        self.tokens = min(self.tokens + self.ratio, self.burst)

    def try_spend(self) -> bool:
        """Take one retry if the budget allows."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
