"""Per-endpoint circuit breaker: take an endpoint that keeps failing out, probe it back in.

    closed ──(failure_threshold consecutive failures)──> open
    open ──(open_s elapsed; one probe request allowed)──> half_open
    half_open ──(probe succeeds)──> closed
    half_open ──(probe fails)──> open

An upstream's `Retry-After` opens the breaker for that long (capped), so a
rate-limited endpoint is not hammered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["Breaker", "State"]

State = Literal["closed", "open", "half_open"]
STATES: tuple[State, ...] = ("closed", "open", "half_open")
_MAX_RETRY_AFTER_S = 60.0


class Breaker:
    """The state of one endpoint; `on_change(state)` is called on every transition."""

    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.state: State = "closed"
        self.failures = 0
        self.open_until = 0.0
        self._probing = False
        self._on_change = on_change

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def available(self, now: float | None = None) -> bool:
        """Whether a request may go to this endpoint now (without claiming the probe)."""
        if self.state == "closed":
            return True
        now = time.monotonic() if now is None else now
        if self.state == "open":
            return now >= self.open_until
        return not self._probing

    def acquire(self, now: float | None = None) -> bool:
        """Claim the endpoint for one request; in half-open only one probe at a time."""
        if not self.available(now):
            return False
        if self.state == "open":
            self._set("half_open")
        if self.state == "half_open":
            self._probing = True
        return True

    def success(self) -> None:
        """The request succeeded."""
        self.failures = 0
        self._probing = False
        self._set("closed")

    def failure(self, retry_after_s: float | None = None) -> None:
        """The request failed; open after enough consecutive failures or on Retry-After."""
        self.failures += 1
        self._probing = False
        now = time.monotonic()
        if retry_after_s is not None and retry_after_s > 0:
            self.open_until = now + min(retry_after_s, _MAX_RETRY_AFTER_S)
            self._set("open")
        elif self.state == "half_open" or self.failures >= self.failure_threshold:
            self.open_until = now + self.open_s
            self._set("open")

    def release(self) -> None:
        """The request ended without a verdict on the endpoint (e.g. the client left)."""
        self._probing = False
