"""The student-share controller's window and factor in Redis, one for every replica.

A replica sends the scores it routed since its last update (`routing.share_update_every`);
one Lua script appends them to the shared window (a list trimmed to `routing.share_window`),
finds the factor that would have sent the target share of that window to students, moves the
shared factor part of the way there (as `router.controller` does in process) and returns it
with the window's observed student share. Every replica adopts the returned factor, so all
route by one threshold whatever mix each one sees. The update runs off the request path.
"""

from __future__ import annotations

import asyncio

from router.config import RoutingConfig
from router.controller import GAIN, Adopt
from router.state import SharedState, Unavailable

__all__ = ["ShareWindow"]

# KEYS: the window list, the factor. ARGV: window size, target share, the top student's
# threshold, min and max threshold, gain, then the batch's entries: the score for a request
# sent to a student, the score + 2 for one sent elsewhere (scores are in [0, 1]).
# Returns the factor and the window's student share as strings (Lua numbers would be cut
# to integers).
_SYNC = """
local window, target, top = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local low, high, gain = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for i = 7, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -window, -1)
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local scores, students = {}, 0
for j, v in ipairs(items) do
  local x = tonumber(v)
  if x >= 2 then x = x - 2 else students = students + 1 end
  scores[j] = x
end
local function clamp(f)
  return math.min(math.max(top * f, low), high) / top
end
local factor = tonumber(redis.call('GET', KEYS[2])) or clamp(1.0)
local n = #scores
if n > 0 then
  table.sort(scores)
  local k = math.min(math.floor(target * n), n - 1)
  local ideal = 1.0
  if top > 0 then ideal = scores[k + 1] / top end
  factor = factor + gain * (clamp(ideal) - factor)
  redis.call('SET', KEYS[2], string.format('%.17g', factor))
end
if n == 0 then return {string.format('%.17g', factor), 'nan'} end
return {string.format('%.17g', factor), string.format('%.17g', students / n)}
"""


class ShareWindow:
    """Sends a replica's routed scores to the shared window and hands back the shared factor."""

    def __init__(self, state: SharedState, routing: RoutingConfig, top: float) -> None:
        assert routing.target_student_share is not None, "only a controller with a target shares"
        self.state = state
        self._script = state.script(_SYNC)
        self._keys = [state.key("share", "window"), state.key("share", "factor")]
        self._args: list[object] = [
            routing.share_window,
            routing.target_student_share,
            top,
            routing.min_score_threshold,
            routing.max_score_threshold,
            GAIN,
        ]
        self._tasks: set[asyncio.Task[None]] = set()

    def push(self, batch: list[tuple[float, bool]], done: Adopt) -> None:
        """Send the batch off the request path; `done` gets (factor, share), or None on failure."""
        task = asyncio.get_running_loop().create_task(self._sync(batch, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, batch: list[tuple[float, bool]], done: Adopt) -> None:
        entries = [f"{s:.6f}" if student else f"{s + 2:.6f}" for s, student in batch]
        try:
            factor, share = await self.state.run(self._script, self._keys, self._args + entries, "share")
        except Unavailable:
            done(None)
            return
        done((float(factor), float(share)))

    async def aclose(self) -> None:
        """Wait for updates in flight."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
